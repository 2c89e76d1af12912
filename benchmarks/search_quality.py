"""Does the search find compact networks, and can the shared supernet's ranking be trusted?

Phases, all real, on Fashion-MNIST and the demo's space (``resnet_pool`` at stem width 16,
stem stride 2: 81 networks):

1. ``table``: every network trained stand-alone on the server's search split (2 epochs, SGD,
   2 seeds), scored on a fixed 5,000-image slice of the test set (the truth the searches are
   judged by) and on the validation split. Rows are appended to
   ``results/search_quality_rows.jsonl`` as they finish, so an interrupted table resumes.
2. ``searches``: SizeAwarePolicyGradient in both modes with the demo's default reward, NNI's
   Random and RegularizedEvolution, 5 seeds each at equal budget; the ranking of the shared
   supernet (with and without warm-up) against the table. Output:
   ``results/search_quality.json``.

    python benchmarks/search_quality.py --phase table --workers 2
    python benchmarks/search_quality.py --phase searches
    python benchmarks/search_quality.py --phase probes      # one-seed probes of the ranking, merged in
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = RESULTS / "search_quality_rows.jsonl"
#: the demo's space (examples/fmnist_quickstart.yaml)
SPACE = {"preset": "resnet_pool", "stem_width": 16, "stem_stride": 2}
SERVER_FRACTION, VAL_FRACTION, SPLIT_SEED = 0.1, 0.2, 0
TEST_IMAGES = 5000
EPOCHS, BATCH, LR = 2, 64, 0.05


def make_space() -> Any:
    from nni_fedexit import ResNetBlockPoolSpace

    return ResNetBlockPoolSpace.from_preset(SPACE["preset"], **{k: v for k, v in SPACE.items() if k != "preset"})


def search_split(data_dir: str | None = None) -> tuple[Any, Any, Any]:
    """(train, val, test slice) of the benchmark: the server's search split at SERVER_FRACTION."""
    from nni_fedexit import load_dataset, split_roles

    data = load_dataset("fashion-mnist", data_dir=data_dir)
    roles = split_roles(len(data.train), SERVER_FRACTION, VAL_FRACTION, seed=SPLIT_SEED)
    test = data.test.subset(list(range(TEST_IMAGES)))
    return data.train.subset(roles.search_train), data.train.subset(roles.search_val), test


def architecture(sample: dict) -> str:
    from nni_fedexit.space import architecture_label

    return architecture_label(sample)


def _train_one(job: tuple[dict, int, str | None]) -> dict:
    import torch
    from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier

    sample, seed, data_dir = job
    torch.set_num_threads(1)
    train, val, test = search_split(data_dir)
    space = make_space()
    torch.manual_seed(seed)
    model = space.build(sample)
    t = time.time()
    train_classifier(model, train, TrainSettings(epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=seed))
    return {"architecture": architecture(sample), "sample": sample, "seed": seed,
            "params": space.count_params(sample), "test_accuracy": evaluate_accuracy(model, test),
            "val_accuracy": evaluate_accuracy(model, val), "seconds": time.time() - t}


def build_rows(args: argparse.Namespace) -> list[dict]:
    """Every (network, seed) of the table, trained where ROWS lacks it."""
    space = make_space()
    samples = [dict(zip(space.labels, combo)) for combo in itertools.product(*[list(p) for p in space.pools.values()])]
    done: list[dict] = []
    if ROWS.is_file():
        done = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    have = {(r["architecture"], r["seed"]) for r in done}
    jobs = [(s, seed, args.data_dir) for seed in args.table_seeds for s in samples if (architecture(s), seed) not in have]
    print(f"table: {len(done)} rows done, {len(jobs)} to train", flush=True)
    RESULTS.mkdir(exist_ok=True)
    with mp.get_context("spawn").Pool(args.workers) as pool, ROWS.open("a") as out:
        for i, row in enumerate(pool.imap_unordered(_train_one, jobs), start=1):
            out.write(json.dumps(row) + "\n")
            out.flush()
            done.append(row)
            print(f"[{i}/{len(jobs)}] {row['architecture']} seed {row['seed']}: test {row['test_accuracy']:.4f} "
                  f"({row['params']:,} params, {row['seconds']:.0f} s)", flush=True)
    return done


# ---- the table as the searches read it ----------------------------------------------------


def table_from_rows(rows: list[dict], seeds: list[int]) -> list[dict]:
    """``[{"architecture", "params", "macs", "accuracy", ...}]``: the mean over ``seeds`` of each network."""
    space = make_space()
    by_arch: dict[str, list[dict]] = {}
    for r in rows:
        if r["seed"] in seeds:
            by_arch.setdefault(r["architecture"], []).append(r)
    table = []
    for arch, rs in sorted(by_arch.items()):
        if len(rs) < len(seeds):
            raise SystemExit(f"the table lacks seeds of {arch}: run --phase table first")
        sample = rs[0]["sample"]
        table.append({
            "architecture": arch, "sample": sample, "params": space.count_params(sample),
            "macs": space.count_macs(sample),
            "accuracy": sum(r["test_accuracy"] for r in rs) / len(rs),
            "val_accuracy": sum(r["val_accuracy"] for r in rs) / len(rs),
            "per_seed": {str(r["seed"]): r["test_accuracy"] for r in rs},
            "train_seconds": sum(r["seconds"] for r in rs) / len(rs),
        })
    return table


_LOOKUP: dict[str, dict] = {}
_REPORT_REWARD: list[Any] = []


def report_measured(model: Any) -> None:
    """The trial of the tabular searches: what one stand-alone training of this network measured
    (the seed ``_REPORT_REWARD[1]``); NNI's built-in strategies get the reward as their metric."""
    import nni

    row = _LOOKUP[architecture(model.arch)]
    accuracy = row["per_seed"][str(_REPORT_REWARD[1])]
    reward = _REPORT_REWARD[0]
    metric = accuracy if reward is None else reward(accuracy, row["params"])
    nni.report_final_result({"default": metric, "params": row["params"]})


def kendall_tau(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


#: the shared search as the preset runs it, and the two variants the ranking is compared with
VARIANTS = {
    "preset": {},
    "without_warmup": {"warmup_epochs": 0, "path_sampling": "controller"},  # ENAS as it was
    "warmup_then_controller_paths": {"path_sampling": "controller"},
}


def shared_search(seed: int, variant: str, train: Any, val: Any, table: list[dict], args: argparse.Namespace,
                  work_dir: Path) -> dict:
    """One real shared-mode search (an NNI experiment), then every network scored with its shared weights."""
    import torch
    from nni.nas.experiment import NasExperiment
    from nni_fedexit.job.pipeline import shared_search_evaluator
    from nni_fedexit.search.strategy import SizeAwarePolicyGradient

    torch.manual_seed(seed)
    space = make_space()
    strategy = SizeAwarePolicyGradient.from_preset("size_aware_pg", seed=seed, **VARIANTS[variant])
    evaluator = shared_search_evaluator(train, val, 10, epochs=args.shared_epochs, batch_size=BATCH,
                                        learning_rate=args.shared_lr, seed=seed, progress=False)
    exp = NasExperiment(space, evaluator, strategy)
    exp.config.experiment_working_directory = str(work_dir)
    t0 = time.time()
    try:
        exp.run()
        chosen = {str(k): v for k, v in exp.export_top_models(formatter="dict")[0].items()}
    finally:
        exp.stop()
    seconds = time.time() - t0
    supernet = strategy.path_accuracies([row["sample"] for row in table])
    return {"chosen": chosen, "seconds": seconds, "supernet_accuracy": supernet,
            "kendall_tau": kendall_tau(supernet, [row["accuracy"] for row in table])}


def tabular_search(name: str, seed: int, budget: int, reward: Any) -> dict:
    """One search whose trials report the table's measured accuracy (NNI's sequential engine)."""
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.execution.event import ModelEventType
    from nni.nas.space import SimplifiedModelSpace
    from nni.nas.strategy import Random, RegularizedEvolution
    from nni_fedexit.search.strategy import SizeAwarePolicyGradient

    space = make_space()
    if name == "pg_trials":
        strategy = SizeAwarePolicyGradient.from_preset("size_aware_pg_trials", seed=seed,
                                                       target=_default_target())
        _REPORT_REWARD[:] = [None, seed % 2]
    else:
        strategy = (Random(dedup=True, seed=seed) if name == "random"
                    else RegularizedEvolution(population_size=10, sample_size=4, dedup=True, seed=seed))
        _REPORT_REWARD[:] = [reward, seed % 2]
    seen: list[tuple[dict, float]] = []
    engine = SequentialExecutionEngine(max_model_count=budget)
    engine.register_model_event_callback(
        ModelEventType.FinalMetric, lambda e: seen.append((dict(e.model.sample), e.metric)))
    t0 = time.time()
    strategy(SimplifiedModelSpace.from_model(space, FunctionalEvaluator(report_measured)), engine)
    seconds = time.time() - t0
    if name == "pg_trials":
        best = max(strategy.records, key=lambda r: r["reward"])["sample"]
    else:
        best = max(seen, key=lambda pair: pair[1]["default"] if isinstance(pair[1], dict) else pair[1])[0]
    trained = {architecture(s) for s, _ in seen}
    return {"chosen": best, "seconds": seconds + sum(_LOOKUP[a]["train_seconds"] for a in trained),
            "trained": len(trained)}


def _default_target() -> dict:
    from nni_fedexit.presets import load_preset

    data, _ = load_preset("strategies", "size_aware_pg")
    return data["target"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_searches(args: argparse.Namespace) -> dict:
    import logging
    import tempfile

    import torch
    from nni_fedexit.search.reward import SizeTarget

    logging.getLogger("nni").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    table = table_from_rows(rows, args.table_seeds)
    _LOOKUP.update({row["architecture"]: row for row in table})
    space = make_space()
    P = space.baseline_params()
    reward = SizeTarget.of(_default_target()).reward(P)
    budget_best = max(row["accuracy"] for row in table if row["params"] <= P)

    def outcome(strategy: str, seed: int, chosen: dict, seconds: float, **extra: Any) -> dict:
        row = _LOOKUP[architecture(chosen)]
        out = {"strategy": strategy, "seed": seed, "architecture": row["architecture"], "params": row["params"],
               "table_accuracy": row["accuracy"], "regret": budget_best - row["accuracy"], "seconds": seconds,
               **extra}
        print(f"{strategy} seed {seed}: {row['architecture']} {row['params']:,} params, table accuracy "
              f"{row['accuracy']:.4f}, regret {out['regret']:+.4f} ({seconds:.0f} s)", flush=True)
        return out

    train, val, _ = search_split(args.data_dir)
    searches, supernets = [], {}
    taus: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            r = shared_search(seed, "preset", train, val, table, args, Path(tmp))
            taus["preset"].append(r["kendall_tau"])
            supernets[f"preset_seed{seed}"] = r["supernet_accuracy"]
            searches.append(outcome("pg_shared", seed, r["chosen"], r["seconds"], kendall_tau=r["kendall_tau"]))
        for name in ("without_warmup", "warmup_then_controller_paths"):
            for seed in args.seeds[: args.cold_seeds]:
                r = shared_search(seed, name, train, val, table, args, Path(tmp))
                taus[name].append(r["kendall_tau"])
                supernets[f"{name}_seed{seed}"] = r["supernet_accuracy"]
                print(f"{name}, seed {seed}: chose {architecture(r['chosen'])}, Kendall tau {r['kendall_tau']:.3f}",
                      flush=True)
    for name in ("pg_trials", "random", "evolution"):
        for seed in args.seeds:
            r = tabular_search(name, seed, args.budget, reward)
            searches.append(outcome(name, seed, r["chosen"], r["seconds"], trained=r["trained"]))
    summary = {}
    for name in ("pg_shared", "pg_trials", "random", "evolution"):
        mine = [s for s in searches if s["strategy"] == name]
        summary[name] = {
            "mean_regret": sum(s["regret"] for s in mine) / len(mine),
            "at_most_P": sum(s["params"] <= P for s in mine),
            "within_1_point_and_at_most_P": sum(s["params"] <= P and s["regret"] <= 0.01 for s in mine),
            "seeds": len(mine),
        }
    return {
        "baseline_params": P,
        "space": SPACE,
        "data": {"dataset": "fashion-mnist", "server_fraction": SERVER_FRACTION, "val_fraction": VAL_FRACTION,
                 "train_images": len(train), "val_images": len(val), "test_images": TEST_IMAGES},
        "table_training": {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "optimizer": "SGD momentum 0.9, cosine",
                           "seeds": args.table_seeds},
        "reward": {"form": "target", **_default_target(), "T": reward.target},
        "best_accuracy_at_most_P": budget_best,
        "table": [{k: row[k] for k in ("architecture", "params", "macs", "accuracy", "val_accuracy", "per_seed")}
                  for row in table],
        "ranking": {"kendall_tau": _mean(taus["preset"]), "kendall_tau_without_warmup": _mean(taus["without_warmup"]),
                    "kendall_tau_warmup_then_controller_paths": _mean(taus["warmup_then_controller_paths"]),
                    "kendall_tau_two_standalone_seeds": kendall_tau(
                        [row["per_seed"]["0"] for row in table], [row["per_seed"]["1"] for row in table]),
                    "per_seed": taus, "variants": VARIANTS, "supernet_accuracy": supernets},
        "searches": searches,
        "summary": summary,
        "settings": {"budget": args.budget, "shared_epochs": args.shared_epochs, "shared_lr": args.shared_lr,
                     "threads": args.threads, "seeds": args.seeds},
        "notes": "table accuracy: mean test accuracy (first 5,000 test images) of 2 stand-alone trainings; "
                 "pg_trials, random and evolution trials report one of those trainings (seed = search seed % 2), "
                 "their seconds add the table's training time of the networks they trained; pg_shared is a real "
                 "NNI experiment training the supernet on the same search split",
    }


#: one-seed probes of what else might raise the supernet's ranking: (name, variant, epochs, lr)
PROBES = [("lr_0.005", "preset", 4, 0.005), ("lr_0.02", "preset", 4, 0.02),
          ("running_bn_lr_0.005", "running_bn", 4, 0.005), ("epochs_8_lr_0.005", "preset", 8, 0.005)]


def run_probes(args: argparse.Namespace) -> dict:
    """Seed 0 of the shared search under each PROBES setting; Kendall tau against the table."""
    import logging
    import tempfile

    import torch

    logging.getLogger("nni").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    table = table_from_rows(rows, args.table_seeds)
    train, val, _ = search_split(args.data_dir)
    VARIANTS["running_bn"] = {"bn_eval": "running"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant, epochs, lr in PROBES:
            probe = argparse.Namespace(**{**vars(args), "shared_epochs": epochs, "shared_lr": lr})
            r = shared_search(0, variant, train, val, table, probe, Path(tmp))
            out[name] = {"variant": VARIANTS[variant], "epochs": epochs, "lr": lr, "seed": 0,
                         "kendall_tau": r["kendall_tau"], "chosen": architecture(r["chosen"]),
                         "supernet_accuracy_range": [min(r["supernet_accuracy"]), max(r["supernet_accuracy"])]}
            print(f"probe {name}: Kendall tau {r['kendall_tau']:.3f}, supernet accuracy "
                  f"{min(r['supernet_accuracy']):.3f}..{max(r['supernet_accuracy']):.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["table", "searches", "probes", "all"], default="all")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cold-seeds", type=int, default=2, help="shared searches of each other variant, for the ranking")
    parser.add_argument("--budget", type=int, default=20, help="trials of each multi-trial search")
    parser.add_argument("--shared-epochs", type=int, default=4)
    parser.add_argument("--shared-lr", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.phase in ("table", "all"):
        build_rows(args)
    if args.phase in ("searches", "all"):
        result = run_searches(args)
        (RESULTS / "search_quality.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({"ranking": {k: v for k, v in result["ranking"].items() if "kendall" in k},
                          "summary": result["summary"]}, indent=1))
    if args.phase in ("probes", "all"):  # merged into the searches' JSON
        path = RESULTS / "search_quality.json"
        result = json.loads(path.read_text())
        result["ranking"]["probes"] = run_probes(args)
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
