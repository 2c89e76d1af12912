"""The trial of a classic ``nnictl`` experiment over the block-pool space (examples/nnictl/).

``python -m nni_fedexit.nni_tools.nnictl_trial [options]`` asks NNI for the next architecture
(``{"stage1": "resnet34", ...}``, from the search-space JSON that
:func:`~nni_fedexit.search_space_json.to_nni_search_space` writes), builds it with
``space.build(sample)``, and then either

- trains it briefly on the server's search-train split (the same data roles and training loop as
  the ``trials`` search, :mod:`nni_fedexit.trial`), reporting the validation accuracy after every
  epoch as an intermediate result, or
- with ``--federated``, trains its exit-point model on simulated edge clients
  (:func:`nni_fedexit.federated.federate`), which reports one intermediate result per round;

and reports ``{"default": validation accuracy, "params": p_h}`` as the final result, from which the
SizeAwarePG tuner computes the size-aware reward. Outside NNI, ``--sample JSON`` picks the
architecture (default: the baseline, every stage from the first source network).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from nni_fedexit.nni_compat import import_nni

nni = import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched

from nni_fedexit.data import DataBundle, load_dataset
from nni_fedexit.space import ResNetBlockPoolSpace, architecture_label
from nni_fedexit.search.trial import TrialSettings, search_split
from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier

__all__ = ["main", "train_sample", "federate_sample"]


def _sample(space: ResNetBlockPoolSpace, given: Mapping[str, Any] | None) -> dict[str, str]:
    """The architecture to evaluate: NNI's parameters, checked against the space's pools."""
    if not given:
        return space.baseline_sample()
    missing = [label for label in space.labels if label not in given]
    if missing:
        raise ValueError(f"the parameters {dict(given)} have no choice for {missing}: the experiment's search space "
                         "must be the JSON of this block-pool space (nni-fedexit space --nni-json FILE)")
    sample = {label: given[label] for label in space.labels}
    for label, choice in sample.items():
        if choice not in space.pools[label]:
            raise ValueError(f"{label}: {choice!r} is not in its block pool {list(space.pools[label])}; regenerate "
                             "the search-space JSON from the same --space preset")
    return sample


def train_sample(space: ResNetBlockPoolSpace, sample: Mapping[str, str], settings: TrialSettings,
                 data: DataBundle | None = None) -> dict[str, float]:
    """Train ``sample`` on the search-train split; report per-epoch and final results to NNI."""
    s = settings
    train, val = search_split(s, data)
    torch.manual_seed(s.seed)  # the network's initial weights: a trial's result is reproducible
    model = space.build(sample)
    accuracy = 0.0
    for epoch in range(s.epochs):
        # one cosine cycle per epoch, its peak on a cosine over the epochs (1 epoch: trial.py's schedule)
        lr = s.lr * 0.5 * (1 + math.cos(math.pi * epoch / s.epochs))
        train_classifier(model, train, TrainSettings(epochs=1, batch_size=s.batch_size, lr=lr, seed=s.seed + epoch))
        accuracy = evaluate_accuracy(model, val)
        nni.report_intermediate_result({"default": accuracy, "epoch": epoch + 1})
    result = {"default": accuracy, "params": float(space.count_params(sample))}
    nni.report_final_result(result)
    return result


def federate_sample(space: ResNetBlockPoolSpace, sample: Mapping[str, str], data: DataBundle | None = None,
                    **settings: Any) -> dict[str, float]:
    """Federated training of ``sample``'s exit-point model; ``federate`` reports every round and the end."""
    from nni_fedexit.federated import FederatedSettings
    from nni_fedexit.federated.evaluator import FederatedData, federate

    fed = FederatedSettings(**settings)
    torch.manual_seed(fed.seed)  # the network's initial weights: a trial's result is reproducible
    result = federate(space.build(sample), fed, data=FederatedData(fed, data), report=True)
    return {"default": float(result.best["exit_accuracy"][-1]), "params": float(result.params)}


def _parser() -> argparse.ArgumentParser:
    d = TrialSettings()
    p = argparse.ArgumentParser(prog="python -m nni_fedexit.nni_tools.nnictl_trial", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="resnet_pool", help="block-pool space preset or YAML file (default: %(default)s)")
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--data-dir", default=None, help="folder with the data set's files (default: the system copy)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default: %(default)s)")
    p.add_argument("--train-samples", type=int, default=d.train_samples, help="cap on training images (default: %(default)s)")
    p.add_argument("--val-samples", type=int, default=d.val_samples, help="cap on validation images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of this trial (0: torch's default); with N concurrent trials on C cores, C/N")
    p.add_argument("--sample", default=None, help="outside NNI: the architecture as JSON (default: the baseline)")
    f = p.add_argument_group("federated (--federated)")
    f.add_argument("--federated", action="store_true", help="train the exit-point model on simulated edge clients")
    f.add_argument("--rounds", type=int, default=2)
    f.add_argument("--clients", type=int, default=4)
    f.add_argument("--client-samples", type=int, default=800, help="images shared among all clients")
    f.add_argument("--local-epochs", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = _parser().parse_args(argv)
    t0 = time.time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # concurrent trials on a small CPU must not oversubscribe it
    given = nni.get_next_parameter() if nni.get_trial_id() != "STANDALONE" else None
    if given is None and args.sample:
        given = json.loads(args.sample)
    data = load_dataset(args.dataset, data_dir=args.data_dir)  # the space's input and classes follow the data
    space = ResNetBlockPoolSpace.from_preset(args.space, in_chans=data.in_chans, image_size=data.image_size,
                                             num_classes=data.num_classes)
    sample = _sample(space, given)
    print(f"architecture: {architecture_label(sample)}; p_h = {space.count_params(sample):,} "
          f"(baseline P = {space.baseline_params():,})", flush=True)
    if args.federated:
        result = federate_sample(
            space, sample, data, rounds=args.rounds, num_clients=args.clients, min_clients=min(2, args.clients),
            client_samples=args.client_samples, val_samples=args.val_samples, test_samples=args.val_samples,
            local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, dataset=args.dataset,
            data_dir=args.data_dir, seed=args.seed,
        )
    else:
        settings = replace(TrialSettings(), dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                           train_samples=args.train_samples, val_samples=args.val_samples,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        result = train_sample(space, sample, settings, data)
    print(f"result: {json.dumps(result)} in {time.time() - t0:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
