"""Early exits that pay off: per-exit thresholds against one shared threshold, with a held-out
margin, in MACs and in measured batch-1 latency, on the demo's trained network.

Reads the run directory of ``make demo`` (``runs/fmnist_quickstart``: its searched and
federated network and its data split). For each rule (``shared``: one threshold for every exit,
the rule S4 started with; ``per_exit``: a threshold per exit) and each accuracy-drop target, the
thresholds are learnt on the server's 2,400 validation images and certified on its 9,600
search-train images (whose labels the federated model never trained on), then measured on the
10,000 test images: the accuracy drop against the last exit alone, the MACs saved, and the
latency saved by the exported early-exit runtime (segments) against the exported last-exit
network, both run one image at a time in this process with ONNX Runtime and with TorchScript
(one CPU thread each). ``no_margin`` holds what the same rules give fitted to the validation
images alone, the way calibration worked before; ``no_learn_margin`` the held-out test of a path
learnt without its own bound; ``batches`` the latency at small batch sizes.

    make demo   # once: trains the demo's network (about 6-9 minutes)
    python benchmarks/early_exit_payoff.py [--run runs/fmnist_quickstart] [--targets 0.005 0.01 0.02]

Writes ``results/early_exit_payoff.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from nni_fedexit.exits import (
    RULES, EarlyExitRuntime, LatencySettings, ThresholdSetting, certified_thresholds, exit_costs, exit_scores,
    export_early_exit, measure_latency, onnx_available, per_exit_thresholds, shared_thresholds,
)
from nni_fedexit.exits.thresholds import threshold_grid
from nni_fedexit.job.config import load_config
from nni_fedexit.job.pipeline import Run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "fmnist_quickstart"), help="a finished run directory")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--confidence-level", type=float, default=0.95)
    parser.add_argument("--latency-images", type=int, default=2000)
    parser.add_argument("--out", default=str(RESULTS / "early_exit_payoff.json"))
    args = parser.parse_args()

    run_dir = Path(args.run)
    if not (run_dir / "model.safetensors").is_file():
        raise SystemExit(f"{run_dir} holds no trained network: run `make demo` first (or pass --run RUN_DIR)")
    torch.set_num_threads(2)
    run = Run(load_config(run_dir / "config.yaml", {"run_dir": str(run_dir)}))
    model = run.model()
    val = run.data.train.subset(run.roles.search_val)
    held_out = run.data.train.subset(run.roles.search_train)
    test = run.federated_data().test
    costs = exit_costs(model, test.images[:1])
    last_macs = costs[-1].macs  # the network without early exits: the last exit's branch alone
    on_test = exit_scores(model, test, costs)
    test_acc = on_test.correct.double().mean(dim=1).tolist()
    on_val = exit_scores(model, val, costs)
    on_held_out = exit_scores(model, held_out, costs)
    formats = ("onnx", "torchscript") if onnx_available() else ("torchscript",)
    latency = LatencySettings(images=args.latency_images)
    images = test.images.numpy()
    print(f"{run_dir}: {model.arch}, test accuracy per exit {' '.join(f'{a:.4f}' for a in test_acc)}")

    def on_test_images(thresholds: list[float]) -> tuple[ThresholdSetting, float]:
        """What ``thresholds`` give on the test images, and the share of the last exit's MACs saved."""
        got = on_test.evaluate(thresholds)
        return got, 1 - got.expected_cost / last_macs

    rows, no_margin, no_learn_margin, batches = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model.thresholds = [0.5] * model.num_exits  # exported once; each row's runtime gets its own thresholds
        t0 = time.time()
        export_early_exit(model, tmp, test.images[:2], formats=formats)
        print(f"exported the segments and the last-exit network ({', '.join(formats)}) in {time.time() - t0:.0f} s")
        for rule in RULES:
            choose = per_exit_thresholds if rule == "per_exit" else shared_thresholds
            for target in args.targets:
                # what calibrate(model, val, held_out=held_out, rule=rule) does, on the exit scores computed once
                cert = certified_thresholds(on_val, on_held_out, target, rule=rule, confidence_level=args.confidence_level)
                got, macs_saved = on_test_images(cert.thresholds)
                for fmt in formats:
                    timing = measure_latency(EarlyExitRuntime(tmp, fmt, thresholds=cert.thresholds), images, latency)
                    rows.append({
                        "rule": rule, "target_drop": target, "val_drop": cert.learnt.drop,
                        "test_drop": got.drop, "macs_saved": macs_saved, "latency_saved": timing["latency_saved"],
                        "format": fmt, "batch_size": 1, "prediction": "exit", "thresholds": cert.thresholds,
                        "held_out_drop": cert.held_out.drop, "drop_bound": cert.drop_bound,
                        "test_exit_share": got.exit_share, "early_exit_ms": timing["early_exit_s"] * 1e3,
                        "last_exit_ms": timing["last_exit_s"] * 1e3,
                    })
                    print(f"{rule:8s} target {target:.3f} {fmt:11s}: val drop {rows[-1]['val_drop']:+.4f}, test drop "
                          f"{got.drop:+.4f}, MACs saved {macs_saved:.1%}, latency saved {timing['latency_saved']:.1%} "
                          f"({timing['early_exit_s'] * 1e3:.3f} against {timing['last_exit_s'] * 1e3:.3f} ms)")
                loose = certified_thresholds(on_val, on_held_out, target, rule=rule, confidence_level=args.confidence_level,
                                             learn_margin=False)  # the learnt path without its own bound
                got_loose, saved_loose = on_test_images(loose.thresholds)
                no_learn_margin.append({"rule": rule, "target_drop": target, "test_drop": got_loose.drop,
                                        "macs_saved": saved_loose, "thresholds": loose.thresholds,
                                        "tested": len(loose.tested)})
                plain = choose(on_val, threshold_grid(), max_accuracy_drop=target)
                fitted, saved_plain = on_test_images(plain.thresholds)
                no_margin.append({"rule": rule, "target_drop": target, "val_drop": plain.drop, "test_drop": fitted.drop,
                                  "macs_saved": saved_plain, "thresholds": plain.thresholds})
                if rule == "per_exit" and target == args.targets[0] and "onnx" in formats:
                    runtime = EarlyExitRuntime(tmp, "onnx", thresholds=cert.thresholds)
                    for size in (1, 8, 32):
                        timing = measure_latency(runtime, images, LatencySettings(batch_size=size, images=args.latency_images))
                        batches.append({"rule": rule, "target_drop": target, **timing})
                        print(f"  onnx batch {size:2d}: latency saved {timing['latency_saved']:.1%}")

    result = {
        "cpu": cpu_name(), "threads": 1, "torch_threads": 2, "run": str(run_dir), "architecture": model.arch,
        "val_images": len(val), "held_out_images": len(held_out), "test_images": len(test),
        "confidence_level": args.confidence_level, "latency_images": args.latency_images,
        "exits": [{"exit": c.exit, "params": c.params, "macs": c.macs, "early_exit_macs": c.early_exit_macs,
                   "test_accuracy": a} for c, a in zip(costs, test_acc)],
        "rows": rows, "no_margin": no_margin, "no_learn_margin": no_learn_margin, "batches": batches,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
