"""Does the size-aware policy-gradient search beat random search at equal budget?

Two phases, both real:

1. ``table``: every architecture of the block-pool space (``resnet_pool``: 81 networks) is
   trained once on the server's Fashion-MNIST search split (CPU-sized: a few thousand images, one
   epoch, seed 0) and scored on the validation split; accuracy, p_h and the size-aware reward go
   to ``results/fmnist_table.json``. This is the tabular-benchmark method (as NAS-Bench-101/201):
   every search below sees the same measured numbers, so the comparison is about the search,
   not about training noise, and costs one training per architecture.
2. ``search``: SizeAwarePolicyGradient (``trials`` mode) and NNI's own ``Random`` strategy
   (without repeats) run through NNI's sequential execution engine with an evaluator that reports
   the table's measured accuracy of the sampled architecture, for several seeds; the best reward
   found after each trial is recorded. Output: ``results/search_vs_random.json``.

    python benchmarks/search_vs_random.py                 # both phases (table is cached)
    python benchmarks/search_vs_random.py --phase search --seeds 0 1 2 3 4 --budget 40
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import nni
from nni_fedexit import ResNetBlockPoolSpace, load_dataset, split_roles
from nni_fedexit.search.reward import SizeAwareReward
from nni_fedexit.search.strategy import SizeAwarePolicyGradient
from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier

RESULTS = Path(__file__).resolve().parent / "results"


def build_table(args: argparse.Namespace) -> dict:
    path = RESULTS / "fmnist_table.json"
    if path.is_file() and not args.rebuild:
        return json.loads(path.read_text())
    torch.set_num_threads(2)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    roles = split_roles(len(data.train), server_fraction=0.2, val_fraction=0.2, seed=0)
    train = data.train.subset(roles.search_train[: args.train_samples])
    val = data.train.subset(roles.search_val[: args.val_samples])
    space = ResNetBlockPoolSpace.from_preset(args.space)
    reward = SizeAwareReward(space.baseline_params(), beta=args.beta)
    rows = []
    t0 = time.time()
    combos = list(itertools.product(*[list(pool) for pool in space.pools.values()]))
    for i, combo in enumerate(combos):
        sample = dict(zip(space.labels, combo))
        torch.manual_seed(0)
        model = space.build(sample)
        t = time.time()
        train_classifier(model, train, TrainSettings(epochs=1, batch_size=64, lr=0.05, seed=0))
        acc = evaluate_accuracy(model, val)
        p = space.count_params(sample)
        rows.append({"sample": sample, "accuracy": acc, "params": p, "reward": reward(acc, p),
                     "train_seconds": time.time() - t})
        print(f"[{i + 1}/{len(combos)}] {combo}: acc {acc:.4f}, {p:,} params, reward {rows[-1]['reward']:.4f}",
              flush=True)
    table = {
        "space": args.space, "baseline_params": space.baseline_params(), "beta": args.beta,
        "train_images": len(train), "val_images": len(val), "epochs": 1, "seconds": time.time() - t0,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return table


def _key(sample: dict) -> str:
    return json.dumps({str(k): v for k, v in sorted(sample.items())})


_TABLE: dict[str, dict] = {}


def report_from_table(model: torch.nn.Module) -> None:
    """The evaluator both strategies run: the table's measured numbers of this frozen network."""
    row = _TABLE[_key(model.arch)]
    nni.report_final_result({"default": row["accuracy"], "params": row["params"]})


def run_search(table: dict, args: argparse.Namespace) -> dict:
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.execution.event import ModelEventType
    from nni.nas.space import SimplifiedModelSpace
    from nni.nas.strategy import Random

    logging.getLogger("nni").setLevel(logging.WARNING)
    logging.getLogger("nni_fedexit").setLevel(logging.WARNING)
    _TABLE.update({_key(r["sample"]): r for r in table["rows"]})
    space = ResNetBlockPoolSpace.from_preset(table["space"])
    best_possible = max(r["reward"] for r in table["rows"])

    def trained_samples(strategy) -> list[dict]:
        seen: list[dict] = []
        engine = SequentialExecutionEngine(max_model_count=args.budget)
        engine.register_model_event_callback(ModelEventType.TrainingEnd, lambda e: seen.append(dict(e.model.sample)))
        strategy(SimplifiedModelSpace.from_model(space, FunctionalEvaluator(report_from_table)), engine)
        return seen

    methods = {
        "size_aware_pg": lambda seed: SizeAwarePolicyGradient(
            mode="trials", samples_per_update=args.samples_per_update, seed=seed, beta=table["beta"],
            controller={"lr": args.lr}),
        "random": lambda seed: Random(dedup=True, seed=seed),
    }
    out: dict = {"budget": args.budget, "seeds": args.seeds, "best_possible_reward": best_possible, "methods": {}}
    for name, make in methods.items():
        curves, chosen = [], []
        for seed in args.seeds:
            seen = trained_samples(make(seed))
            rewards = [_TABLE[_key(s)]["reward"] for s in seen]
            curves.append(np.maximum.accumulate(rewards).tolist())
            best = seen[int(np.argmax(rewards))]
            chosen.append({"seed": seed, "sample": best, "reward": max(rewards),
                           "distinct_trained": len({_key(s) for s in seen})})
        curve = np.array(curves)
        found = [bool(c[-1] >= best_possible - 1e-12) for c in curves]
        out["methods"][name] = {
            "best_reward_vs_budget_mean": curve.mean(axis=0).tolist(),
            "best_reward_vs_budget_per_seed": curves,
            "found_optimum": found,
            "chosen": chosen,
        }
        print(f"{name}: best reward after {args.budget} trials, mean over {len(args.seeds)} seeds "
              f"{curve[:, -1].mean():.4f} (optimum {best_possible:.4f}, found in {sum(found)} seeds)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["table", "search", "both"], default="both")
    parser.add_argument("--space", default="resnet_pool")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-samples", type=int, default=3000)
    parser.add_argument("--val-samples", type=int, default=2000)
    parser.add_argument("--beta", type=int, default=14)
    parser.add_argument("--rebuild", action="store_true", help="retrain the table even if cached")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--samples-per-update", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    table = build_table(args)
    if args.phase == "table":
        return
    result = run_search(table, args)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "data_dir"}
    (RESULTS / "search_vs_random.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
