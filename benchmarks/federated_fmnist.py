"""Federated training of the exit-point model on Fashion-MNIST, next to a centrally trained copy.

10 simulated edge clients share the client part of the training set, IID and Dirichlet(0.5); each
round every client trains a randomly assigned branch model (the patent's rule) for one local
epoch. A copy of the same network, same initial weights, is trained centrally on the union of
the clients' data for as many epochs as there were rounds. Per-exit test accuracies of both go to
``results/federated_fmnist.json``.

    python benchmarks/federated_fmnist.py [--rounds 10] [--client-samples 12000]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from nni_fedexit import ResNetBlockPoolSpace
from nni_fedexit.data import ImageData
from nni_fedexit.exits import MultiExitNetwork, exit_accuracies, exit_outputs, multi_exit_loss
from nni_fedexit.federated import FederatedData, FederatedSettings, federate
from nni_fedexit.training import TrainSettings, train_classifier

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--client-samples", type=int, default=12000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="fmnist")
    args = parser.parse_args()
    torch.set_num_threads(2)

    table = RESULTS / "fmnist_table.json"
    space = ResNetBlockPoolSpace.from_preset("resnet_pool")
    sample = (max(json.loads(table.read_text())["rows"], key=lambda r: r["reward"])["sample"]
              if table.is_file() else space.baseline_sample())
    torch.manual_seed(args.seed)
    initial = MultiExitNetwork.from_architecture(space, sample, head="conv")
    out: dict = {"architecture": sample, "rounds": args.rounds, "clients": args.clients,
                 "client_samples": args.client_samples, "runs": {}}
    data = None
    for name, extra in (("iid", {"partition": "iid"}), ("dirichlet_0.5", {"partition": "dirichlet", "alpha": 0.5})):
        s = FederatedSettings(rounds=args.rounds, num_clients=args.clients, client_samples=args.client_samples,
                              data_dir=args.data_dir, lr=args.lr, seed=args.seed, **extra)
        data = FederatedData(s)
        t0 = time.time()
        result = federate(copy.deepcopy(initial), s, data=data, report=False)
        out["runs"][name] = {
            "seconds": time.time() - t0, "best_round": result.best_round, "test_accuracy": result.test_accuracy,
            "label_skew": data.label_skew, "client_samples": [c["samples"] for c in result.clients],
            "val_accuracy_per_round": [h["exit_accuracy"] for h in result.history],
        }
        print(f"{name}: {time.time() - t0:.0f} s, best round {result.best_round}, test accuracy per exit "
              + " ".join(f"{a:.4f}" for a in result.test_accuracy), flush=True)

    # the same network, same initial weights, trained centrally on all the clients' data
    assert data is not None
    union = ImageData(torch.cat([c.images for c in data.clients]), torch.cat([c.labels for c in data.clients]))
    central = copy.deepcopy(initial)
    t0 = time.time()
    train_classifier(central, union, TrainSettings(epochs=args.rounds, batch_size=32, lr=args.lr, seed=args.seed,
                                                   schedule="constant"),
                     loss_fn=lambda outs, y: multi_exit_loss(outs, y, central.loss_weights))
    logits, labels = exit_outputs(central, data.test)
    out["runs"]["central"] = {"seconds": time.time() - t0, "epochs": args.rounds,
                              "test_accuracy": exit_accuracies(logits, labels)}
    print("central: test accuracy per exit " + " ".join(f"{a:.4f}" for a in out["runs"]["central"]["test_accuracy"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"federated_{args.tag}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
