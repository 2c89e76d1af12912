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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["table", "searches", "all"], default="all")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table-seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    if args.phase in ("table", "all"):
        build_rows(args)


if __name__ == "__main__":
    main()
