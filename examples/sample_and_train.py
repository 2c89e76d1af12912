"""Build the block-pool space, sample one network with NNI, train it briefly on Fashion-MNIST.

    python examples/sample_and_train.py [--data-dir DIR]

The same thing as `nni-fedexit demo`, written out as Python for users of the API.
"""

import argparse

import numpy as np
import torch

from nni_fedexit import ResNetBlockPoolSpace, load_dataset, split_roles
from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    roles = split_roles(len(data.train), server_fraction=0.2, val_fraction=0.2, seed=args.seed)

    space = ResNetBlockPoolSpace.from_preset("resnet_pool")
    rs = np.random.RandomState(args.seed)
    sample = {label: choice.random(random_state=rs) for label, choice in space.simplify().items()}
    model = space.build(sample)
    print(f"sample {sample}: {space.count_params(sample):,} parameters (baseline {space.baseline_params():,})")

    train_classifier(model, data.train.subset(roles.search_train), TrainSettings(epochs=1), progress=True)
    print(f"validation accuracy {evaluate_accuracy(model, data.train.subset(roles.search_val)):.4f}")


if __name__ == "__main__":
    main()
