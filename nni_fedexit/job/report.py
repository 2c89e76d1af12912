"""report.md and its plots, written from the JSON files of a run directory (nothing recomputed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nni_fedexit.files import read_json  # noqa: E402

__all__ = ["write_report"]


def _load(run: Path, name: str) -> Any:
    path = run / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    return read_json(path, FileNotFoundError, "run the stage that writes it again")


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plots/{path.name}"


def _finish(ax: Any, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _plots(run: Path, search: dict, arch: dict, fed: dict, part: dict, ev: dict) -> dict[str, str]:
    plots = run / "plots"
    out = {}
    steps = search["controller_steps"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if steps:
        ax.plot([s["step"] for s in steps], [s["mean_reward"] for s in steps], label="mean reward of the batch")
        ax.plot([s["step"] for s in steps], [s["baseline"] for s in steps], label="moving-average baseline")
    _finish(ax, "controller step", "reward", "Search: reward over controller steps", legend=bool(steps))
    out["reward"] = _save(fig, plots / "reward.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    by_arch: dict[str, list[dict]] = {}
    for rec in search["samples"]:
        by_arch.setdefault(json.dumps(rec["sample"], sort_keys=True), []).append(rec)
    sampled = [(g[0]["params"], sum(r["accuracy"] for r in g) / len(g), len(g)) for g in by_arch.values()]
    ax.scatter([p / 1e6 for p, _, _ in sampled], [a for _, a, _ in sampled], s=[8 + 4 * n for _, _, n in sampled],
               alpha=0.5, label="sampled while searching (mean accuracy; size = times sampled)")
    seen = search["final_candidates"] or search["samples"]
    if search["final_candidates"]:
        ax.scatter([c["params"] / 1e6 for c in seen], [c["accuracy"] for c in seen], s=20, color="C1",
                   label="final candidates, scored on all validation data")
    chosen = next((s for s in seen if s["sample"] == arch["sample"]), None)
    if chosen is not None:
        ax.scatter([chosen["params"] / 1e6], [chosen["accuracy"]], marker="*", s=160, color="C3", label="chosen")
    ax.axvline(arch["baseline_params"] / 1e6, color="gray", ls="--", lw=1, label=f"{arch['baseline']} baseline size")
    _finish(ax, "parameters (M)", "validation accuracy", "Search: accuracy vs size")
    out["arch"] = _save(fig, plots / "accuracy_vs_params.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = fed["rounds"]
    for i in range(len(rounds[0]["exit_accuracy"])):
        ax.plot([r["round"] for r in rounds], [r["exit_accuracy"][i] for r in rounds], marker=".", label=f"exit {i + 1}")
    ax.axvline(fed["best_round"], color="gray", ls="--", lw=1, label="best round")
    _finish(ax, "round", "validation accuracy", "Federated training: per-exit accuracy")
    out["rounds"] = _save(fig, plots / "rounds.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    curve = ev["test_curve"]
    ax.plot([p["expected_macs"] / 1e6 for p in curve], [p["accuracy"] for p in curve], ".-", ms=3, label="early exit")
    ax.plot([e["macs"] / 1e6 for e in ev["exits"]], [e["test_accuracy"] for e in ev["exits"]], "s", label="single exit")
    ax.plot([ev["test"]["expected_macs"] / 1e6], [ev["test"]["accuracy"]], "*", ms=12, label="calibrated thresholds")
    _finish(ax, "expected MMACs per image", "test accuracy", "Early exits: accuracy vs compute")
    out["exits"] = _save(fig, plots / "early_exit.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    clients = part["clients"]
    bottom = [0] * len(clients)
    for label in range(len(clients[0]["labels"])):
        counts = [c["labels"][label] for c in clients]
        ax.bar([c["client"] for c in clients], counts, bottom=bottom, label=str(label))
        bottom = [b + n for b, n in zip(bottom, counts)]
    ax.set_xlabel("client")
    ax.set_ylabel("images")
    ax.set_title(f"Client partition: {part['scheme']} (label skew {part['label_skew']:.2f})")
    ax.legend(fontsize=6, ncol=5, title="class", title_fontsize=7)
    out["partition"] = _save(fig, plots / "partition.png")
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` of a finished run; returns the report's path."""
    run = Path(run_dir)
    search = _load(run, "search/history.json")
    arch = _load(run, "search/architecture.json")
    fed = _load(run, "federated/metrics.json")
    part = _load(run, "federated/partition.json")
    ev = _load(run, "evaluation.json")
    exports = _load(run, "export/exports.json") if (run / "export" / "exports.json").is_file() else []
    plots = _plots(run, search, arch, fed, part, ev)
    best = fed["rounds"][fed["best_round"] - 1]
    lines = [
        f"# nni-fedexit run: {run.name}",
        "",
        "Every number below was measured in this run; the JSON files next to this report hold them.",
        "",
        "## Chosen architecture (S1, S3)",
        "",
        "| stage | block |",
        "|---|---|",
        *[f"| {label} | {block} |" for label, block in arch["sample"].items()],
        "",
        f"Parameters p_h = {arch['params']:,}, {arch['params'] / arch['baseline_params']:.2f} x the "
        f"{arch['baseline']} baseline at the same widths (P = {arch['baseline_params']:,}); "
        f"the space holds {arch['num_architectures']:,} networks. Search: {search['mode']} mode, "
        f"{len(search['controller_steps'])} controller steps, reward beta = {search['beta']} "
        f"(NNI experiment `{search['experiment_id']}`).",
        "",
        f"![reward]({plots['reward']})",
        f"![accuracy vs params]({plots['arch']})",
        "",
        "## Federated training (S4, S5)",
        "",
        f"{len(fed['rounds'])} rounds, {len(part['clients'])} clients, partition {part['scheme']} "
        f"(label skew {part['label_skew']:.3f}); best round {fed['best_round']} (lowest total validation loss). "
        f"NNI experiment `{fed['experiment_id']}`.",
        "",
        "| round | " + " | ".join(f"exit {i + 1} val acc" for i in range(len(best["exit_accuracy"]))) + " | total loss | clients (accepted) |",
        "|---" * (len(best["exit_accuracy"]) + 3) + "|",
        *[
            f"| {r['round']} | " + " | ".join(f"{a:.4f}" for a in r["exit_accuracy"])
            + f" | {r['total_loss']:.4f} | {len(r['clients'])} ({r['accepted']}) |"
            for r in fed["rounds"]
        ],
        "",
        f"![rounds]({plots['rounds']})",
        f"![partition]({plots['partition']})",
        "",
        "## Exits on the test set",
        "",
        "| exit | parameters | MACs | test accuracy |",
        "|---|---|---|---|",
        *[f"| {e['exit']} | {e['params']:,} | {e['macs'] / 1e6:.1f} M | {e['test_accuracy']:.4f} |" for e in ev["exits"]],
        *([f"| ensemble of exits 1..{len(ev['exits'])} (mean probability) | | {ev['exits'][-1]['early_exit_macs'] / 1e6:.1f} M "
           f"| {ev['ensemble_accuracy']:.4f} |"] if ev.get("ensemble_accuracy") is not None else []),
        "",
        f"Early exits with thresholds {', '.join(f'{t:.2f}' for t in ev['thresholds'][:-1])} ({ev['criterion']}, "
        f"{'each exit predicting with the mean probability of the exits up to it' if ev.get('prediction') == 'ensemble' else 'each exit on its own'}), "
        f"calibrated on {ev['val_images']:,} validation images for {ev['target']}: test accuracy "
        f"{ev['test']['accuracy']:.4f} (last exit alone {ev['test']['last_exit_accuracy']:.4f}) at "
        f"{ev['test']['expected_macs'] / 1e6:.1f} M MACs per image, {ev['test']['macs_saved']:.1%} less than the last "
        f"exit alone; exits taken: " + ", ".join(f"{s:.1%}" for s in ev["test"]["exit_share"]) + ".",
        "",
        f"![early exits]({plots['exits']})",
        "",
    ]
    if exports:
        lines += ["## Exported branches", "", "| branch | format | file | max abs error vs PyTorch |", "|---|---|---|---|"]
        lines += [f"| {r['branch']} | {r['format']} | `{Path(r['path']).name}` | {r['max_abs_error']:.1e} |" for r in exports]
        lines.append("")
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
