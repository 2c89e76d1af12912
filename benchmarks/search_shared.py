"""The patent's search (S3, weight-sharing mode) on Fashion-MNIST, as one NNI experiment.

Trains the block-pool supernet and the LSTM controller on the server's search split, then scores
K sampled architectures with the shared weights and exports the best reward. Writes
``results/search_shared_<tag>.json``: the chosen architecture, the K scored candidates, and the
controller's steps.

    python benchmarks/search_shared.py [--device cuda] [--epochs 4] [--widths 16 32 64 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nni_fedexit import ResNetBlockPoolSpace, SizeAwarePolicyGradient, load_dataset, split_roles
from nni_fedexit.job.pipeline import shared_search_evaluator

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from nni.nas.experiment import NasExperiment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--space", default="resnet_pool")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--final-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    roles = split_roles(len(data.train), seed=args.seed)
    train = data.train.subset(roles.search_train[: args.train_samples])
    val = data.train.subset(roles.search_val)
    space = ResNetBlockPoolSpace.from_preset(args.space, **({"widths": args.widths} if args.widths else {}))
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    evaluator = shared_search_evaluator(train, val, 10, epochs=args.epochs, batch_size=args.batch_size,
                                        learning_rate=1e-3, device=args.device, seed=args.seed, progress=False)
    strategy = SizeAwarePolicyGradient(final_samples=args.final_samples, seed=args.seed)
    exp = NasExperiment(space, evaluator, strategy)
    exp.config.experiment_working_directory = str(Path(args.out) / "nni-experiments")
    t0 = time.time()
    try:
        exp.run()
        best = exp.export_top_models(formatter="dict")[0]
    finally:
        exp.stop()
    seconds = time.time() - t0
    chosen = next(c for c in strategy.final_candidates if c["sample"] == best)
    result = {
        "device": torch.cuda.get_device_name() if accelerator == "gpu" else "cpu",
        "widths": list(space.spec.widths), "epochs": args.epochs, "train_images": len(train), "val_images": len(val),
        "seconds": seconds, "chosen": chosen, "baseline_params": space.baseline_params(),
        "final_candidates": strategy.final_candidates, "controller_steps": strategy.learner.history,
        "probabilities": strategy.learner.probabilities(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"search_shared_{args.tag}.json").write_text(json.dumps(result, indent=1))
    print(f"{seconds:.0f} s; chose {best}: val accuracy {chosen['accuracy']:.4f} with shared weights, "
          f"{chosen['params']:,} params (P = {space.baseline_params():,}), reward {chosen['reward']:.4f}")


if __name__ == "__main__":
    main()
