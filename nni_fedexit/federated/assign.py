"""S5: which clients take part in a round, and which branch model each one trains.

``random`` is the patent's rule (claim 5: branch models are assigned to the edge devices at
random): ``uniform`` over the depths, or ``proportional`` (depth d with probability proportional
to d): a deep stage is trained only by the clients that draw a branch that deep, so with uniform
draws the last of L stages sees 1/L of the clients per round, too few labels under label skew. ``capability`` gives each client the deepest branch its device can afford: a client
profile states a compute budget as a fraction of the full model's MACs per image (so one profile
mix fits any architecture), and a client whose budget is below branch 1's cost sits the round out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ClientProfile", "DEFAULT_PROFILE_MIX", "DEPTH_SAMPLING", "client_profiles", "select_clients",
           "assign_branches"]

#: how random mode draws a branch depth: "uniform" or "proportional" (P(d) proportional to d)
DEPTH_SAMPLING = ("uniform", "proportional")


@dataclass(frozen=True)
class ClientProfile:
    """An edge device class: its name and the share of the full model's MACs it can run."""

    name: str
    budget: float


#: a mix of device classes (profile, share of clients): phones and micro-controllers that run
#: about a third of the full network, mid-range devices two thirds, and edge servers all of it
DEFAULT_PROFILE_MIX: tuple[tuple[ClientProfile, float], ...] = (
    (ClientProfile("low-end", 0.35), 0.3),
    (ClientProfile("mid-range", 0.7), 0.4),
    (ClientProfile("high-end", 1.0), 0.3),
)


def client_profiles(
    num_clients: int, mix: Sequence[tuple[ClientProfile, float]] = DEFAULT_PROFILE_MIX, seed: int = 0
) -> list[ClientProfile]:
    """One profile per client, drawn from ``mix`` (seeded)."""
    shares = np.array([share for _, share in mix], dtype=float)
    if len(shares) == 0 or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"profile mix needs non-negative shares with a positive sum, got {list(shares)}")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(mix), size=num_clients, p=shares / shares.sum())
    return [mix[i][0] for i in picks]


def select_clients(num_clients: int, fraction: float, min_clients: int, rng: np.random.Generator) -> list[int]:
    """``max(min_clients, round(fraction * num_clients))`` distinct clients, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"client fraction must be in (0, 1], got {fraction}")
    k = min(num_clients, max(min_clients, int(round(fraction * num_clients))))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def assign_branches(
    clients: Sequence[int],
    num_exits: int,
    mode: str,
    rng: np.random.Generator,
    budgets: Sequence[float] | None = None,
    exit_macs: Sequence[float] | None = None,
    depth_sampling: str = "uniform",
) -> dict[int, int]:
    """``{client: branch depth}`` (1-based). In ``random`` mode depth d is drawn uniformly, or with
    ``depth_sampling="proportional"`` with probability proportional to d. In ``capability`` mode
    ``budgets[client]`` is the fraction of ``exit_macs[-1]`` the client can run; clients that fit
    no branch are left out."""
    if mode == "random":
        if depth_sampling == "uniform":
            return {int(c): int(rng.integers(1, num_exits + 1)) for c in clients}
        if depth_sampling != "proportional":
            raise ValueError(f"depth_sampling must be one of {list(DEPTH_SAMPLING)}, got {depth_sampling!r}")
        p = np.arange(1, num_exits + 1, dtype=float)
        return {int(c): int(rng.choice(num_exits, p=p / p.sum())) + 1 for c in clients}
    if mode != "capability":
        raise ValueError(f"branch assignment must be 'random' or 'capability', got {mode!r}")
    if budgets is None or exit_macs is None or len(exit_macs) != num_exits:
        raise ValueError("capability assignment needs every client's budget and every exit's MACs")
    full = float(exit_macs[-1])
    out: dict[int, int] = {}
    for c in clients:
        fits = [i + 1 for i, m in enumerate(exit_macs) if m <= budgets[c] * full + 1e-9]
        if fits:
            out[int(c)] = max(fits)
    return out
