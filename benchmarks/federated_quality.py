"""Federated quality side by side: our exit-point model and its training options against the
alternatives a user would pick instead, on identical Fashion-MNIST client data.

For every data setting (10 clients; IID, Dirichlet(0.5) for three seeds, Dirichlet(0.1), and two
classes per client) every row gets the same client partitions, rounds, local epochs and test set:

- ``peer_cnn_fedavg``: plain FedAvg of NIID-Bench's 44k-parameter CNN (conv 6 -> conv 16 -> 120
  -> 84 -> 10), written here, every client every round, with our clients' local SGD (lr 0.05,
  momentum 0.9, batch 32, weight decay 5e-4): at these few local steps NIID-Bench's lr 0.01 and
  batch 64 leave it far below its best (0.31 on Dirichlet(0.5) in a trial run);
- ``full_model_fedavg``: the searched network's full model (one exit, at the end) with plain FedAvg;
- ``multi_exit_fedavg``: the method as it was before the options below (random branches,
  multi-exit loss, depth-aware FedAvg, averaged BatchNorm statistics);
- one row per option alone on top of it (``distill``, ``fedprox``, ``feddyn``, ``fedavgm``,
  ``fedadam``, ``fedyogi``, ``bn_server``, ``bn_local``) on the partitions given by ``--option-partitions``;
- ``defaults``: FederatedSettings() as shipped (the options chosen from these measurements);
- ``central``: the same exit-point model trained on the union of the clients' data for
  rounds x local epochs epochs (equal sample passes), plain multi-exit loss.

Every multi-exit row also gives ``ensemble_accuracy`` (mean of the exits' probabilities).
Output: ``results/federated_quality.json`` (rows are merged by (method, partition, alpha,
classes_per_client, seed), so runs can be split) and ``results/federated_quality.png``.

    python benchmarks/federated_quality.py                       # everything (CPU: about 40 minutes)
    python benchmarks/federated_quality.py --methods multi_exit_fedavg bn_server --settings dirichlet0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_fedexit import ResNetBlockPoolSpace
from nni_fedexit.data import ImageData
from nni_fedexit.exits import MultiExitNetwork, ensemble_accuracy, exit_accuracies, exit_outputs, multi_exit_loss
from nni_fedexit.federated import FederatedData, FederatedSettings, federate
from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "federated_quality.json"

#: the demo's searched architecture (make demo, seed 0)
ARCHITECTURE = {"stage1": "resnet34", "stage2": "resnet18", "stage3": "resnet50", "stage4": "resnet34"}

#: the method before this benchmark's options: every option at its neutral value
TODAY = {"objective": "multi_exit", "aggregator": "fedavg", "distill_weight": 0.0, "bn_stats": "average",
         "depth_sampling": "uniform", "lr": 0.05, "momentum": 0.9}
OPTIONS: dict[str, dict[str, Any]] = {
    "distill": {"distill_weight": 1.0},
    "fedprox": {"objective": "fedprox", "prox_mu": 0.01},
    "feddyn": {"objective": "feddyn", "dyn_alpha": 0.01},
    "fedavgm": {"aggregator": "fedavgm", "server_lr": 1.0, "server_momentum": 0.5},
    "fedadam": {"aggregator": "fedadam", "server_lr": 0.01},
    "fedyogi": {"aggregator": "fedyogi", "server_lr": 0.01},
    "bn_server": {"bn_stats": "server"},
    "bn_local": {"bn_stats": "local"},
    "depth_proportional": {"depth_sampling": "proportional"},
}
#: ablation of the label-skew collapse (Dirichlet 0.5): one suspect removed at a time
ABLATION: dict[str, dict[str, Any]] = {
    "no_client_momentum": {"momentum": 0.0, "lr": 0.05},
    "every_client_deepest": {"assignment": "capability", "profile_mix": [["full", 1.0, 1.0]]},
}
DATA_SETTINGS = {
    "iid": {"partition": "iid"},
    "dirichlet0.5": {"partition": "dirichlet", "alpha": 0.5},
    "dirichlet0.1": {"partition": "dirichlet", "alpha": 0.1},
    "shards2": {"partition": "shards", "classes_per_client": 2},
}
ALL_METHODS = ["peer_cnn_fedavg", "full_model_fedavg", "multi_exit_fedavg", *OPTIONS, *ABLATION, "defaults", "central"]


class PeerCNN(nn.Module):
    """NIID-Bench's CNN for 28x28 grey images (44,426 parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 4 * 4, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def peer_fedavg(data: FederatedData, rounds: int, epochs: int, seed: int) -> dict[str, Any]:
    """Plain FedAvg of PeerCNN: every client every round, sample-weighted mean of the weights."""
    torch.manual_seed(seed)
    model = PeerCNN(data.bundle.num_classes)
    for t in range(1, rounds + 1):
        total, sums = 0, None
        for c, client in enumerate(data.clients):
            local = copy.deepcopy(model)
            train_classifier(local, client, TrainSettings(epochs=epochs, batch_size=32, lr=0.05, momentum=0.9,
                                                          weight_decay=5e-4, seed=seed * 1000 + t * 100 + c,
                                                          schedule="constant"))
            n = len(client)
            state = {k: v.double() * n for k, v in local.state_dict().items()}
            sums = state if sums is None else {k: sums[k] + v for k, v in state.items()}
            total += n
        model.load_state_dict({k: (v / total).float() for k, v in sums.items()})
    return {"test_accuracy": [evaluate_accuracy(model, data.test)], "ensemble_accuracy": None,
            "params": sum(p.numel() for p in model.parameters())}


def exit_point_model(space: ResNetBlockPoolSpace, seed: int, single_exit: bool = False) -> MultiExitNetwork:
    torch.manual_seed(seed)
    model = MultiExitNetwork.from_architecture(space, ARCHITECTURE, head="conv")
    if not single_exit:
        return model
    torch.manual_seed(seed)  # the full network with its one exit at the end: no intermediate exits
    return MultiExitNetwork(model.stem, [nn.Sequential(*model.stages)], [space.spec.widths[-1]], model.num_classes,
                            head="conv")


def federated_row(space: ResNetBlockPoolSpace, settings: FederatedSettings, data: FederatedData,
                  single_exit: bool = False) -> dict[str, Any]:
    model = exit_point_model(space, settings.seed, single_exit)
    result = federate(model, settings, data=data, report=False)
    last = result.history[-1]
    return {"test_accuracy": result.test_accuracy, "ensemble_accuracy": result.ensemble_accuracy,
            "params": sum(p.numel() for p in result.model.parameters()), "best_round": result.best_round,
            "val_last_exit_per_round": [h["exit_accuracy"][-1] for h in result.history],
            "val_last_round": last["exit_accuracy"], "val_best_round": result.best["exit_accuracy"]}


def central_row(space: ResNetBlockPoolSpace, settings: FederatedSettings, data: FederatedData) -> dict[str, Any]:
    model = exit_point_model(space, settings.seed)
    union = ImageData(torch.cat([c.images for c in data.clients]), torch.cat([c.labels for c in data.clients]))
    train_classifier(model, union, TrainSettings(epochs=settings.rounds * settings.local_epochs, batch_size=32,
                                                 lr=0.05, momentum=0.9, seed=settings.seed, schedule="cosine"),
                     loss_fn=lambda outs, y: multi_exit_loss(outs, y, model.loss_weights))
    logits, labels = exit_outputs(model, data.test)
    return {"test_accuracy": exit_accuracies(logits, labels), "ensemble_accuracy": ensemble_accuracy(logits, labels),
            "params": sum(p.numel() for p in model.parameters())}


def row_key(row: dict[str, Any]) -> tuple:
    return (row["method"], row["partition"], row["alpha"], row["classes_per_client"], row["seed"])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(DATA_SETTINGS)
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, len(methods) * 0.9), 4.5))
    width = 0.8 / len(settings)
    for i, name in enumerate(settings):
        spec = DATA_SETTINGS[name]
        ys = []
        for m in methods:
            vals = [r["test_accuracy"][-1] for r in rows if r["method"] == m and r["partition"] == spec["partition"]
                    and r["alpha"] == (spec.get("alpha") if spec["partition"] == "dirichlet" else None)
                    and r["classes_per_client"] == spec.get("classes_per_client")]
            ys.append(float(np.mean(vals)) if vals else np.nan)
        ax.bar(np.arange(len(methods)) + i * width, ys, width, label=name)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=35, ha="right")
    ax.set_ylabel("test accuracy (last exit; mean over seeds)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("Fashion-MNIST, 10 clients, identical data per setting")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, args: argparse.Namespace, rows: dict[tuple, dict[str, Any]]) -> None:
    doc = {"dataset": "fashion-mnist", "clients": 10, "client_samples": args.client_samples or None,
           "widths": args.widths, "stem_width": args.stem_width, "stem_stride": 1, "architecture": ARCHITECTURE,
           "today": TODAY, "options": OPTIONS, "ablation": ABLATION,
           "defaults": {k: v for k, v in asdict(FederatedSettings()).items()
                        if k in ("objective", "aggregator", "distill_weight", "bn_stats", "depth_sampling", "lr",
                                 "momentum", "server_lr", "server_momentum", "prox_mu", "dyn_alpha")},
           "rows": sorted(rows.values(), key=lambda r: (r["partition"], str(r["alpha"]), r["seed"],
                                                         ALL_METHODS.index(r["method"])))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--client-samples", type=int, default=5000, help="client images in all (0: every one)")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--stem-width", type=int, default=16)
    parser.add_argument("--settings", nargs="+", default=list(DATA_SETTINGS), choices=list(DATA_SETTINGS))
    parser.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS)
    parser.add_argument("--option-partitions", nargs="+", default=["dirichlet0.5"], choices=list(DATA_SETTINGS),
                        help="data settings the single-option and ablation rows run on")
    parser.add_argument("--dirichlet-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--merge", nargs="+", default=[], help="add the rows of these JSON files (runs split "
                        "over processes) to --out, replot, and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = {row_key(r): r for r in previous.get("rows", [])}
    if args.merge:
        for path in args.merge:
            rows.update({row_key(r): r for r in json.loads(Path(path).read_text())["rows"]})
        write(out, args, rows)
        plot(list(rows.values()), out.with_suffix(".png"))
        return
    space = ResNetBlockPoolSpace.from_preset("resnet_pool", widths=args.widths, stem_width=args.stem_width)
    methods = args.methods or ALL_METHODS
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    datasets: dict[tuple[str, int], tuple[dict[str, Any], FederatedData]] = {}
    central: dict[int, dict[str, Any]] = {}

    def data_for(name: str, seed: int) -> tuple[dict[str, Any], FederatedData]:
        if (name, seed) not in datasets:
            base = dict(rounds=args.rounds, num_clients=10, local_epochs=args.local_epochs, seed=seed,
                        client_samples=args.client_samples or None, data_dir=args.data_dir, device=args.device,
                        val_samples=1000, **DATA_SETTINGS[name])
            datasets[(name, seed)] = base, FederatedData(FederatedSettings(**base))
        return datasets[(name, seed)]

    for method in methods:  # method by method, so the rows that matter most come first
        for name in args.settings:
            spec = DATA_SETTINGS[name]
            seeds = args.dirichlet_seeds if name == "dirichlet0.5" else [0]
            for seed in seeds:
                if (method in OPTIONS or method in ABLATION) and (name not in args.option_partitions or seed != seeds[0]):
                    continue
                base, data = data_for(name, seed)
                t0 = time.time()
                if method == "peer_cnn_fedavg":
                    result = peer_fedavg(data, args.rounds, args.local_epochs, seed)
                elif method == "central":
                    # the union of the clients' images does not depend on the partition: one training per seed
                    if seed not in central:
                        trained = central_row(space, FederatedSettings(**{**base, **TODAY}), data)
                        central[seed] = {**trained, "seconds": time.time() - t0}
                    result = central[seed]
                elif method == "defaults":
                    result = federated_row(space, FederatedSettings(**base), data)
                else:
                    extra = {**TODAY, **OPTIONS.get(method, {}), **ABLATION.get(method, {})}
                    result = federated_row(space, FederatedSettings(**{**base, **extra}), data,
                                           single_exit=method == "full_model_fedavg")
                row = {"method": method, "partition": spec["partition"],
                       "alpha": spec.get("alpha") if spec["partition"] == "dirichlet" else None,
                       "classes_per_client": spec.get("classes_per_client"), "rounds": args.rounds,
                       "local_epochs": args.local_epochs, "seed": seed, "seconds": time.time() - t0, **result,
                       "label_skew": data.label_skew, "device": device}
                rows[row_key(row)] = row
                print(f"{name} seed {seed} {method}: test accuracy {' '.join(f'{a:.4f}' for a in row['test_accuracy'])}"
                      + (f", ensemble {row['ensemble_accuracy']:.4f}" if row["ensemble_accuracy"] is not None else "")
                      + f" ({row['seconds']:.0f} s)", flush=True)
                write(out, args, rows)
    plot(list(rows.values()), out.with_suffix(".png"))


if __name__ == "__main__":
    main()
