"""Early exits on real Fashion-MNIST: how much compute do they save at a given accuracy drop?

Trains the multi-exit network of one architecture of the block-pool space on the server's
search split (CPU-sized: a few epochs), calibrates the exit thresholds on the validation split
for 0.5 and 1 point of accuracy drop against the last exit, and measures those thresholds on the
official test set. Writes ``results/early_exit_fmnist.json`` and the accuracy-vs-MACs plot
``results/early_exit_fmnist.png``.

    python benchmarks/early_exit_curve.py [--epochs 3] [--head conv]
    python benchmarks/early_exit_curve.py --device cuda --widths 64 128 256 512 --train-all --epochs 10 --tag gpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nni_fedexit import ResNetBlockPoolSpace, load_dataset, split_roles  # noqa: E402
from nni_fedexit.exits import (  # noqa: E402
    MultiExitNetwork, calibrate, early_exit_metrics, exit_accuracies, exit_costs, exit_outputs, multi_exit_loss,
    threshold_curve,
)
from nni_fedexit.training import TrainSettings, train_classifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--space", default="resnet_pool")
    parser.add_argument("--sample", default=None, help="JSON architecture; default: the search table's best reward")
    parser.add_argument("--head", default="conv", choices=["linear", "conv"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="stage widths (default: the preset's)")
    parser.add_argument("--train-all", action="store_true",
                        help="train on the whole training set but the validation split (default: the server's search split)")
    parser.add_argument("--tag", default="fmnist", help="results/early_exit_<tag>.json and .png")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(2)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    roles = split_roles(len(data.train), seed=args.seed)
    val = data.train.subset(roles.search_val)
    if args.train_all:
        train = data.train.subset(sorted(set(range(len(data.train))) - set(roles.search_val.tolist())))
    else:
        train = data.train.subset(roles.search_train)
    overrides = {"widths": args.widths} if args.widths else {}
    space = ResNetBlockPoolSpace.from_preset(args.space, **overrides)
    if args.sample:
        sample = json.loads(args.sample)
    else:
        table = RESULTS / "fmnist_table.json"
        rows = json.loads(table.read_text())["rows"] if table.is_file() else []
        sample = max(rows, key=lambda r: r["reward"])["sample"] if rows else space.baseline_sample()
    model = MultiExitNetwork.from_architecture(space, sample, head=args.head).to(args.device)
    print(f"architecture {sample}, exit head {args.head}: {sum(p.numel() for p in model.parameters()):,} parameters")

    t0 = time.time()
    losses = train_classifier(
        model, train, TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        progress=args.device == "cpu",
        loss_fn=lambda outs, y: multi_exit_loss(outs, y, model.loss_weights),
    )
    train_seconds = time.time() - t0
    costs = exit_costs(model, data.test.images[:1].to(args.device))
    test_logits, test_labels = exit_outputs(model, data.test)
    test_acc = exit_accuracies(test_logits, test_labels)
    print(f"trained {args.epochs} epochs on {len(train):,} images in {train_seconds:.0f} s; test accuracy per exit "
          + ", ".join(f"{a:.4f}" for a in test_acc))

    targets = {}
    for drop in (0.005, 0.01):
        cal = calibrate(model, val, max_accuracy_drop=drop, costs=costs)
        on_test = early_exit_metrics(test_logits, test_labels, cal.thresholds, costs)
        saved = 1 - on_test["expected_macs"] / costs[-1].macs  # against the network without early exits
        targets[str(drop)] = {
            "threshold": cal.thresholds[0], "val_accuracy": cal.accuracy, "val_last_exit_accuracy": cal.last_exit_accuracy,
            "val_macs_saved": cal.macs_saved, "test": on_test, "test_macs_saved": saved,
            "test_accuracy_drop": test_acc[-1] - on_test["accuracy"],
        }
        print(f"target drop {drop:.3f}: threshold {cal.thresholds[0]:.2f}; on test accuracy {on_test['accuracy']:.4f} "
              f"(last exit {test_acc[-1]:.4f}), expected MACs {on_test['expected_macs']:,.0f} "
              f"= {saved:.1%} saved, exits {[round(s, 3) for s in on_test['exit_share']]}")

    curve = threshold_curve(test_logits, test_labels, costs)
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (2 threads)",
        "widths": list(space.spec.widths), "batch_size": args.batch_size, "images_per_second": args.epochs * len(train) / train_seconds,
        "architecture": sample, "head": args.head, "epochs": args.epochs, "train_images": len(train),
        "val_images": len(val), "test_images": len(data.test), "train_seconds": train_seconds, "train_loss": losses,
        "exits": [{"exit": c.exit, "params": c.params, "macs": c.macs, "early_exit_macs": c.early_exit_macs,
                   "test_accuracy": a} for c, a in zip(costs, test_acc)],
        "targets": targets, "test_curve": curve,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"early_exit_{args.tag}.json").write_text(json.dumps(result, indent=1))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["expected_macs"] / 1e6 for p in curve], [p["accuracy"] for p in curve], ".-", label="early exit (one threshold)")
    ax.plot([c.macs / 1e6 for c in costs], test_acc, "s", label="single exit i")
    for drop, t in targets.items():
        ax.plot(t["test"]["expected_macs"] / 1e6, t["test"]["accuracy"], "*", markersize=12,
                label=f"calibrated for {float(drop) * 100:.1f} pt drop")
    ax.set_xlabel("expected MMACs per image")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Fashion-MNIST test set ({result['device']}): accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"early_exit_{args.tag}.png", dpi=120)


if __name__ == "__main__":
    main()
