"""The two ways a federated run says no: a client update left out, or a run that cannot go on."""

from __future__ import annotations

__all__ = ["FederatedError", "UpdateRejected"]


class FederatedError(RuntimeError):
    """The federated run cannot go on (e.g. too few client updates); the message says why."""


class UpdateRejected(ValueError):
    """A client update that must not be averaged in; the message names the key and the reason."""
