"""report.md and its plots, written from the JSON files of a run directory (nothing recomputed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nni_fedexit.files import read_json  # noqa: E402

__all__ = ["pareto_front", "write_report"]


def _load(run: Path, name: str) -> Any:
    path = run / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    return read_json(path, FileNotFoundError, "run the stage that writes it again")


def _save(fig: Any, path: Path, rect: tuple[float, float, float, float] | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
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


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), cheapest first."""
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def _scored(search: dict) -> list[dict]:
    """Every architecture the search scored, once: its score on all validation data where it was a
    final candidate, else its mean over the validation batches it was sampled on."""
    by_arch: dict[str, list[dict]] = {}
    for rec in search["samples"]:
        by_arch.setdefault(json.dumps(rec["sample"], sort_keys=True), []).append(rec)
    out = {key: {**g[0], "accuracy": sum(r["accuracy"] for r in g) / len(g), "times": len(g), "final": False}
           for key, g in by_arch.items()}
    for c in search.get("final_candidates") or []:
        key = json.dumps(c["sample"], sort_keys=True)
        out[key] = {**out.get(key, {"times": 0}), **c, "final": True}
    return list(out.values())


def _trade_off_plot(path: Path, search: dict, arch: dict) -> str:
    """Accuracy against parameters and against the expected MACs of early exits: every scored
    architecture, the Pareto front, the chosen one, the baseline and the target. The legend sits
    below the axes so that it hides no point."""
    scored = _scored(search)
    target = search.get("target") or {}
    panels = [("params", "parameters (M)", 1e6)]
    if scored and all(r.get("early_exit_macs") is not None for r in scored):
        shares = target.get("exit_shares")
        which = "equal exit shares" if not shares else "exit shares " + " / ".join(f"{q:g}" for q in shares)
        panels.append(("early_exit_macs", f"expected MMACs per image with early exits ({which})", 1e6))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    for ax, (key, label, unit) in zip(axes[0], panels):
        for final, style in ((False, dict(s=14, alpha=0.45, color="C0", label="sampled while searching (mean of its batches)")),
                             (True, dict(s=22, alpha=0.8, color="C1", label="final candidate (all validation data)"))):
            pts = [r for r in scored if r["final"] == final]
            if pts:
                ax.scatter([r[key] / unit for r in pts], [r["accuracy"] for r in pts], zorder=2, **style)
        front = pareto_front([(r[key], r["accuracy"]) for r in scored])
        if front:
            ax.step([c / unit for c, _ in front], [a for _, a in front], where="post", color="C2", lw=1.2, zorder=1,
                    label="Pareto front of the scored networks")
        chosen = next((r for r in scored if r["sample"] == arch["sample"]), None)
        if chosen is not None:
            ax.scatter([chosen[key] / unit], [chosen["accuracy"]], marker="*", s=180, color="C3", zorder=3,
                       edgecolors="black", linewidths=0.5, label="chosen")
        if key == "params":
            ax.axvline(arch["baseline_params"] / unit, color="gray", ls="--", lw=1, label=f"{arch['baseline']} baseline P")
        if target.get("T") and target.get("cost") == key:
            ax.axvline(target["T"] / unit, color="C3", ls=":", lw=1.5, label=f"target T ({target['cost']})")
        _finish(ax, label, "validation accuracy (shared weights)" if search["mode"] == "shared" else "validation accuracy",
                "Search: accuracy vs size" if key == "params" else "Search: accuracy vs early-exit compute", legend=False)
    handles, labels = {}, []
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
                labels.append(l)
    ncol = 3 if len(panels) > 1 else 2
    fig.legend([handles[l] for l in labels], labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    return _save(fig, path, rect=(0, 0.06 * (-(-len(labels) // ncol)), 1, 1))


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

    out["arch"] = _trade_off_plot(plots / "accuracy_vs_params.png", search, arch)

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


def _reward_words(search: dict) -> str:
    target = search.get("target")
    if not target or target.get("T") is None:
        return f"reward Acc * (p_h / P) ** (-1/{search['beta']})"
    return (f"reward Acc * ({target['cost']} / T) ** w with T = {target['T']:,.0f}, w = {target['below']:.3g} at or "
            f"under T and {target['above']:.3g} over it")


def _target(target: dict[str, float]) -> str:
    """An early-exit target in words."""
    if "max_accuracy_drop" in target:
        return f"at most {target['max_accuracy_drop'] * 100:.2f} points of accuracy below the last exit"
    return f"at most {target['macs_budget'] / 1e6:.2f} M MACs per image"


def _best_rule(options: dict[str, Any]) -> str:
    if options.get("best_by") == "last_exit":
        return "highest last-exit validation accuracy"
    return "lowest total validation loss"


def _options_words(o: dict[str, Any]) -> str:
    """The federated training options of a run, in one paragraph."""
    if o.get("assignment") == "capability":
        branches = "each client the deepest branch its device affords"
    else:
        branches = f"a random branch per client and round (depth drawn {o.get('depth_sampling', 'uniform')})"
    training = ("each client trains every stage, the deeper ones in segments within its branch's memory (depthwise)"
                if o.get("client_training") == "depthwise" else "each client trains its branch only")
    objective = {"multi_exit": "the multi-exit loss", "logit_adjusted": f"the multi-exit loss on logits shifted by the "
                 f"client's label prior (logit_adjusted, tau {o.get('logit_tau', 1.0):g})"}.get(o.get("objective", ""),
                                                                                              f"objective {o.get('objective')}")
    distill = f", self-distillation weight {o['distill_weight']:g}" if o.get("distill_weight") else ""
    steps = o.get("server_step_count", o.get("server_steps"))
    server = (f"After each aggregation the server trained the model for {steps} steps on its own "
              f"{o.get('server_images', 0):,} labelled images (server_steps): the model is not trained on the "
              "clients' data alone." if steps else
              "The server did not train the model: only the clients' data trained it.")
    return (f"Training options: {o.get('client_fraction', 1):g} of the clients per round, {o.get('local_epochs', 1)} "
            f"local epoch(s); {branches}; {training}; {objective}{distill}; aggregator {o.get('aggregator')}, "
            f"BatchNorm statistics {o.get('bn_stats')}. {server}")


def _best_exit_words(ev: dict[str, Any]) -> str:
    """What early exits save against the best exit when a shallower one beats the last."""
    t = ev["test"]
    best = t["best_exit"]
    saved = t["macs_saved_vs_best_exit"]
    against = (f"{saved:.1%} less compute than exit {best} alone" if saved >= 0 else
               f"{-saved:.1%} more compute than exit {best} alone")
    return (f"A shallower exit beats the last one on the test images: exit {best} alone has {t['best_exit_accuracy']:.4f} "
            f"(last exit {t['last_exit_accuracy']:.4f}). Against the best exit, early exits give {t['accuracy']:.4f} "
            f"({(t['best_exit_accuracy'] - t['accuracy']) * 100:.2f} points below it) at {against}.")


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` of a finished run; returns the report's path."""
    run = Path(run_dir)
    search = _load(run, "search/history.json")
    arch = _load(run, "search/architecture.json")
    fed = _load(run, "federated/metrics.json")
    part = _load(run, "federated/partition.json")
    ev = _load(run, "evaluation.json")
    exports = _load(run, "export/exports.json") if (run / "export" / "exports.json").is_file() else []
    latency_file = "export/early_exit/latency.json"
    latency = _load(run, latency_file) if (run / latency_file).is_file() else {"timings": []}
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
        f"{len(search['controller_steps'])} controller steps, " + _reward_words(search)
        + (f" (NNI experiment `{search['experiment_id']}`)." if search.get("experiment_id") else " (run in-process, without NNI)."),
        "",
        f"![reward]({plots['reward']})",
        f"![accuracy vs params]({plots['arch']})",
        "",
        "## Federated training (S4, S5)",
        "",
        f"{len(fed['rounds'])} rounds, {len(part['clients'])} clients, partition {part['scheme']} "
        f"(label skew {part['label_skew']:.3f}); best round {fed['best_round']} "
        f"({_best_rule(fed.get('options', {}))}). "
        + (f"NNI experiment `{fed['experiment_id']}`." if fed.get("experiment_id") else "Run in-process, without NNI."),
        "",
        *([_options_words(fed["options"]), ""] if fed.get("options") else []),
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
        f"{'each exit predicting with the mean probability of the exits up to it' if ev.get('prediction') == 'ensemble' else 'each exit on its own'}; "
        f"{'one threshold per exit' if ev.get('rule') == 'per_exit' else 'one threshold for every exit'}), "
        f"calibrated on {ev['val_images']:,} validation images for {_target(ev['target'])}: test accuracy "
        f"{ev['test']['accuracy']:.4f} (last exit alone {ev['test']['last_exit_accuracy']:.4f}) at "
        f"{ev['test']['expected_macs'] / 1e6:.1f} M MACs per image, {ev['test']['macs_saved']:.1%} less than the last "
        f"exit alone; exits taken: " + ", ".join(f"{s:.1%}" for s in ev["test"]["exit_share"]) + ".",
        "",
        *([_best_exit_words(ev), ""] if ev["test"].get("best_exit", len(ev["exits"])) != len(ev["exits"]) else []),
        *([f"Guarantee: {ev['guarantee']}; the held-out split is {ev['held_out_images']:,} images: "
           + ev.get("held_out_split", "the server's search-train images, whose labels the federated model never "
                    "trained on") + ". On the test images the drop was "
           f"{ev['test']['last_exit_accuracy'] - ev['test']['accuracy']:.2%}.", ""] if ev.get("guarantee") else
          ["No margin (`exits.margin: none`): the target holds on the validation images; on unseen ones it may not.",
           ""]),
        *(["| early-exit runtime | per image, early exits | per image, last exit alone | latency saved |",
           "|---|---|---|---|"]
          + [f"| {t['format']}, batch {t['batch_size']}, 1 CPU thread | {t['early_exit_s'] * 1e3:.3f} ms | "
             f"{t['last_exit_s'] * 1e3:.3f} ms | {t['latency_saved']:.1%} |" for t in latency["timings"]]
          + ["", f"Timed on {latency.get('images', 0):,} test images, one at a time, with the exported segments "
             f"in `export/early_exit/` (MACs saved: {ev['test']['macs_saved']:.1%}).", ""]
          if latency["timings"] else []),
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
