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

``--scale demo`` runs at the demo's data and budget instead (``examples/fmnist_quickstart.yaml``:
all 48,000 client images over 10 clients, 3 clients a round, 12 rounds, the stride-2 stem at
widths 16..128, the demo's searched architecture); every row there carries ``"scale": "demo"``
(the others ``"small"``). Its methods: ``peer_cnn_fedavg`` twice, ``"budget": "equal_rounds"``
(12 rounds, every client) and ``"budget": "equal_time"`` (as many rounds as fit in the wall time
of the ``defaults`` row of the same data, measured in the same run); ``full_model_fedavg``;
``previous_defaults`` (the method before the label-skew options: FederatedSettings' defaults
until then); each new option alone on top of it (``depthwise``, ``logit_adjusted``,
``server_steps``, ``best_last_exit``, ``fedavgm``); ``clients_only`` (the defaults with
``server_steps: 0``: the clients' data alone, as the peer has); ``defaults`` (``FederatedSettings()`` as
shipped); ``central`` (the union of the clients' images for as many images as the defaults' 12
rounds train: 4 epochs).

Output: ``results/federated_quality.json`` (rows are merged by (method, partition, alpha,
classes_per_client, seed, scale, budget), so runs can be split) and
``results/federated_quality.png`` (``federated_quality_demo.png`` for the demo scale).

    python benchmarks/federated_quality.py                       # everything (CPU: about 40 minutes)
    python benchmarks/federated_quality.py --methods multi_exit_fedavg bn_server --settings dirichlet0.5
    python benchmarks/federated_quality.py --scale demo --threads 1   # the demo's size (CPU: hours; split it)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_fedexit import ResNetBlockPoolSpace
from nni_fedexit.data import ImageData
from nni_fedexit.exits import MultiExitNetwork, ensemble_accuracy, exit_accuracies, exit_outputs, multi_exit_loss
from nni_fedexit.federated import FederatedData, FederatedSettings, federate, stable_seed
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

#: the demo scale: its run config, its searched architecture (make demo, seed 0) and space
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "fmnist_quickstart.yaml"
DEMO_ARCHITECTURE = {"stage1": "resnet50", "stage2": "resnet18", "stage3": "resnet18", "stage4": "resnet18"}
#: FederatedSettings' defaults before the label-skew options (the method the issue measured)
PREVIOUS_DEFAULTS = {"client_training": "branch", "objective": "multi_exit", "server_steps": 0, "best_by": "total_loss",
                     "aggregator": "fedavg", "distill_weight": 1.0, "bn_stats": "server", "depth_sampling": "proportional"}
#: each label-skew option alone, on top of the previous defaults
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "depthwise": {"client_training": "depthwise"},
    "logit_adjusted": {"objective": "logit_adjusted"},
    "server_steps": {"server_steps": 150},
    "best_last_exit": {"best_by": "last_exit"},
    "fedavgm": {"aggregator": "fedavgm", "server_lr": 1.0, "server_momentum": 0.5},
}
#: the new defaults trained on the clients' data alone (no server steps): what the peer is also given
CLIENTS_ONLY = {"server_steps": 0}
DEMO_METHODS = ["peer_cnn_fedavg", "full_model_fedavg", "previous_defaults", *DEMO_OPTIONS, "clients_only", "defaults",
                "central"]
#: the settings the small-scale rows' defaults were measured with (before the label-skew options)
OPTIONS_BEFORE = ("objective", "aggregator", "distill_weight", "bn_stats", "depth_sampling")
#: the settings whose values the JSON lists for the defaults (FederatedSettings() as shipped)
REPORTED = ("client_training", "objective", "logit_tau", "server_steps", "server_samples", "best_by", "aggregator",
            "distill_weight", "bn_stats", "depth_sampling", "lr", "momentum", "server_lr", "server_momentum", "prox_mu",
            "dyn_alpha")


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


def peer_fedavg(data: FederatedData, rounds: int, epochs: int, seed: int, seconds: float | None = None) -> dict[str, Any]:
    """Plain FedAvg of PeerCNN: every client every round, sample-weighted mean of the weights.

    With ``seconds``, rounds go on (``rounds`` is then ignored) until the wall time reaches it."""
    torch.manual_seed(seed)
    model = PeerCNN(data.bundle.num_classes)
    start, t = time.time(), 0
    while (t < rounds) if seconds is None else (time.time() - start < seconds):
        t += 1
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
            "params": sum(p.numel() for p in model.parameters()), "rounds": t}


def exit_point_model(space: ResNetBlockPoolSpace, seed: int, single_exit: bool = False,
                     architecture: dict[str, str] = ARCHITECTURE) -> MultiExitNetwork:
    torch.manual_seed(seed)
    model = MultiExitNetwork.from_architecture(space, architecture, head="conv")
    if not single_exit:
        return model
    torch.manual_seed(seed)  # the full network with its one exit at the end: no intermediate exits
    return MultiExitNetwork(model.stem, [nn.Sequential(*model.stages)], [space.spec.widths[-1]], model.num_classes,
                            head="conv")


def federated_row(space: ResNetBlockPoolSpace, settings: FederatedSettings, data: FederatedData,
                  single_exit: bool = False, architecture: dict[str, str] = ARCHITECTURE, as_the_demo: bool = False
                  ) -> dict[str, Any]:
    """One federated run. ``as_the_demo``: the network's initial weights as the demo's federated
    trial makes them (NNI builds it under ``stable_seed(seed)``, federate() adds the exits)."""
    if as_the_demo and not single_exit:
        torch.manual_seed(stable_seed(settings.seed))
        model: nn.Module = space.build(architecture)
    else:
        model = exit_point_model(space, settings.seed, single_exit, architecture)
    result = federate(model, settings, data=data, report=False)
    last = result.history[-1]
    return {"test_accuracy": result.test_accuracy, "ensemble_accuracy": result.ensemble_accuracy,
            "params": sum(p.numel() for p in result.model.parameters()), "best_round": result.best_round,
            "val_last_exit_per_round": [h["exit_accuracy"][-1] for h in result.history],
            # how much the last exit's validation accuracy moves from round to round (mean absolute change)
            "val_swing": float(np.mean(np.abs(np.diff([h["exit_accuracy"][-1] for h in result.history])))),
            "val_last_round": last["exit_accuracy"], "val_best_round": result.best["exit_accuracy"],
            "updates_per_stage": updates_per_stage(result.history, settings, result.model.num_exits)}


def updates_per_stage(history: list[dict[str, Any]], settings: FederatedSettings, num_stages: int) -> list[int]:
    """Client updates that trained each stage over the run (depth-wise clients train every stage)."""
    counts = [0] * num_stages
    for h in history:
        for c in h["clients"]:
            reach = num_stages if settings.client_training == "depthwise" else c["depth"]
            for i in range(reach):
                counts[i] += 1
    return counts


def central_row(space: ResNetBlockPoolSpace, settings: FederatedSettings, data: FederatedData, epochs: int | None = None,
                architecture: dict[str, str] = ARCHITECTURE) -> dict[str, Any]:
    model = exit_point_model(space, settings.seed, architecture=architecture)
    union = ImageData(torch.cat([c.images for c in data.clients]), torch.cat([c.labels for c in data.clients]))
    train_classifier(model, union, TrainSettings(epochs=epochs or settings.rounds * settings.local_epochs, batch_size=32,
                                                 lr=0.05, momentum=0.9, seed=settings.seed, schedule="cosine"),
                     loss_fn=lambda outs, y: multi_exit_loss(outs, y, model.loss_weights))
    logits, labels = exit_outputs(model, data.test)
    return {"test_accuracy": exit_accuracies(logits, labels), "ensemble_accuracy": ensemble_accuracy(logits, labels),
            "params": sum(p.numel() for p in model.parameters()), "epochs": epochs or settings.rounds * settings.local_epochs}


def row_key(row: dict[str, Any]) -> tuple:
    return (row["method"], row["partition"], row["alpha"], row["classes_per_client"], row["seed"],
            row.get("scale", "small"), row.get("budget"))


def plot(rows: list[dict[str, Any]], path: Path, order: list[str] = ALL_METHODS,
         title: str = "Fashion-MNIST, 10 clients, identical data per setting") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(DATA_SETTINGS)
    label = lambda r: r["method"] + (f" ({r['budget'].replace('_', ' ')})" if r.get("budget") else "")  # noqa: E731
    methods = sorted({label(r) for r in rows}, key=lambda m: (order.index(m.split(" ")[0]) if m.split(" ")[0] in order
                                                              else len(order), m))
    fig, ax = plt.subplots(figsize=(max(8, len(methods) * 0.9), 4.5))
    width = 0.8 / len(settings)
    for i, name in enumerate(settings):
        spec = DATA_SETTINGS[name]
        ys = []
        for m in methods:
            vals = [r["test_accuracy"][-1] for r in rows if label(r) == m and r["partition"] == spec["partition"]
                    and r["alpha"] == (spec.get("alpha") if spec["partition"] == "dirichlet" else None)
                    and r["classes_per_client"] == spec.get("classes_per_client")]
            ys.append(float(np.mean(vals)) if vals else np.nan)
        ax.bar(np.arange(len(methods)) + i * width, ys, width, label=name)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=35, ha="right")
    ax.set_ylabel("test accuracy (last exit; mean over seeds)")
    lowest = min((r["test_accuracy"][-1] for r in rows), default=0.3)
    ax.set_ylim(0.0 if lowest < 0.3 else 0.3, 1.0)  # a run at chance stays visible
    ax.legend(ncol=4, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_order(row: dict[str, Any]) -> int:
    order = ALL_METHODS + [m for m in DEMO_METHODS if m not in ALL_METHODS]
    return order.index(row["method"]) if row["method"] in order else len(order)


def write(out: Path, args: argparse.Namespace, rows: dict[tuple, dict[str, Any]]) -> None:
    doc = {"dataset": "fashion-mnist", "clients": 10, "client_samples": 5000,
           "widths": [8, 16, 32, 64], "stem_width": 16, "stem_stride": 1, "architecture": ARCHITECTURE,
           "today": TODAY, "options": OPTIONS, "ablation": ABLATION,
           #: FederatedSettings() as shipped (the demo-scale "defaults" rows; the small rows' "defaults"
           #: ran with the settings then shipped: "small_scale_defaults")
           "defaults": {k: v for k, v in FederatedSettings().model_dump().items() if k in REPORTED},
           "small_scale_defaults": {k: v for k, v in PREVIOUS_DEFAULTS.items() if k in OPTIONS_BEFORE},
           "demo": {"config": str(DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])), "architecture": DEMO_ARCHITECTURE,
                    "previous_defaults": PREVIOUS_DEFAULTS, "options": DEMO_OPTIONS, "clients_only": CLIENTS_ONLY},
           "rows": sorted(rows.values(), key=lambda r: (r.get("scale", "small"), r["partition"], str(r["alpha"]),
                                                         r["seed"], method_order(r), str(r.get("budget"))))}
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
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(set(ALL_METHODS + DEMO_METHODS)))
    parser.add_argument("--option-partitions", nargs="+", default=["dirichlet0.5"], choices=list(DATA_SETTINGS),
                        help="data settings the single-option and ablation rows run on")
    parser.add_argument("--dirichlet-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--merge", nargs="+", default=[], help="add the rows of these JSON files (runs split "
                        "over processes) to --out, replot, and stop")
    parser.add_argument("--scale", choices=["small", "demo"], default="small",
                        help="small: the arguments above; demo: the demo's data, space, architecture and budget")
    parser.add_argument("--budget", choices=["equal_rounds", "equal_time"], nargs="+",
                        default=["equal_rounds", "equal_time"], help="demo scale: the peer's budgets")
    parser.add_argument("--summary", action="store_true", help="print the demo-scale rows of --out as a Markdown "
                        "table (mean over seeds) and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = {row_key(r): r for r in previous.get("rows", [])}
    if args.summary:
        print(summary([r for r in rows.values() if r.get("scale") == "demo"]))
        return
    if args.merge:
        for path in args.merge:
            rows.update({row_key(r): r for r in json.loads(Path(path).read_text())["rows"]})
        write(out, args, rows)
        plot_all(list(rows.values()), out)
        return
    if args.scale == "demo":
        run_demo(args, rows, out)
    else:
        run_small(args, rows, out)
    plot_all(list(rows.values()), out)


def summary(rows: list[dict[str, Any]]) -> str:
    """The demo-scale rows as a Markdown table: per data setting and method, the mean over seeds of
    each exit's test accuracy (the last exit per seed too), the ensemble, the rounds and seconds."""
    lines = ["| data | method | seeds | test accuracy per exit (mean) | last exit per seed | ensemble | rounds | seconds (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"iid": "IID", "dirichlet0.5": "Dirichlet(0.5)", "dirichlet0.1": "Dirichlet(0.1)", "shards2": "2 classes per client"}
    for name, spec in DATA_SETTINGS.items():
        alpha = spec.get("alpha") if spec["partition"] == "dirichlet" else None
        mine = [r for r in rows if r["partition"] == spec["partition"] and r["alpha"] == alpha
                and r["classes_per_client"] == spec.get("classes_per_client")]
        for method in sorted({(method_order(r), r["method"], str(r.get("budget") or "")) for r in mine}):
            group = sorted((r for r in mine if (r["method"], str(r.get("budget") or "")) == method[1:]), key=lambda r: r["seed"])
            acc = np.mean([r["test_accuracy"] for r in group], axis=0)
            ens = [r["ensemble_accuracy"] for r in group if r["ensemble_accuracy"] is not None]
            label = f"`{method[1]}`" + (f" ({method[2].replace('_', ' ')})" if method[2] else "")
            seeds = ",".join(str(r["seed"]) for r in group)
            per_seed = ", ".join("%.4f" % r["test_accuracy"][-1] for r in group) if len(group) > 1 else ""
            ensemble = "%.4f" % np.mean(ens) if ens else ""
            rounds = "/".join(sorted({str(r["rounds"]) for r in group}))
            lines.append(f"| {names[name]} | {label} | {seeds} | {' / '.join('%.4f' % a for a in acc)} | {per_seed} | "
                         f"{ensemble} | {rounds} | {np.mean([r['seconds'] for r in group]):.0f} |")
    return "\n".join(lines)


def plot_all(rows: list[dict[str, Any]], out: Path) -> None:
    plot([r for r in rows if r.get("scale", "small") == "small"], out.with_suffix(".png"))
    demo = [r for r in rows if r.get("scale") == "demo"]
    if demo:
        plot(demo, out.with_name(out.stem + "_demo.png"), DEMO_METHODS,
             "Fashion-MNIST at the demo's size: 10 clients x 4,800 images, 12 rounds")


def device_name(args: argparse.Namespace) -> str:
    return torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"


def print_row(name: str, row: dict[str, Any]) -> None:
    print(f"{name} seed {row['seed']} {row['method']}{' ' + row['budget'] if row.get('budget') else ''}: test accuracy "
          f"{' '.join(f'{a:.4f}' for a in row['test_accuracy'])}"
          + (f", ensemble {row['ensemble_accuracy']:.4f}" if row["ensemble_accuracy"] is not None else "")
          + f" ({row['seconds']:.0f} s)", flush=True)


def data_row(method: str, name: str, seed: int, data: FederatedData, result: dict[str, Any], seconds: float,
             device: str, **extra: Any) -> dict[str, Any]:
    spec = DATA_SETTINGS[name]
    return {"method": method, "partition": spec["partition"],
            "alpha": spec.get("alpha") if spec["partition"] == "dirichlet" else None,
            "classes_per_client": spec.get("classes_per_client"), **extra, "seed": seed, "seconds": seconds,
            **result, "label_skew": data.label_skew, "device": device}


def run_small(args: argparse.Namespace, rows: dict[tuple, dict[str, Any]], out: Path) -> None:
    space = ResNetBlockPoolSpace.from_preset("resnet_pool", widths=args.widths, stem_width=args.stem_width)
    methods = [m for m in (args.methods or ALL_METHODS) if m in ALL_METHODS]
    device = device_name(args)
    datasets: dict[tuple[str, int], tuple[dict[str, Any], FederatedData]] = {}
    central: dict[int, dict[str, Any]] = {}
    small_defaults = {k: PREVIOUS_DEFAULTS[k] for k in PREVIOUS_DEFAULTS if k not in OPTIONS_BEFORE}

    def data_for(name: str, seed: int) -> tuple[dict[str, Any], FederatedData]:
        if (name, seed) not in datasets:
            base = dict(rounds=args.rounds, num_clients=10, local_epochs=args.local_epochs, seed=seed,
                        client_samples=args.client_samples or None, data_dir=args.data_dir, device=args.device,
                        val_samples=1000, **DATA_SETTINGS[name], **small_defaults)
            datasets[(name, seed)] = base, FederatedData(FederatedSettings(**base))
        return datasets[(name, seed)]

    for method in methods:  # method by method, so the rows that matter most come first
        for name in args.settings:
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
                elif method == "defaults":  # the defaults as they were when these rows were measured
                    result = federated_row(space, FederatedSettings(**base, **{k: PREVIOUS_DEFAULTS[k] for k in OPTIONS_BEFORE}), data)
                else:
                    extra = {**TODAY, **OPTIONS.get(method, {}), **ABLATION.get(method, {})}
                    result = federated_row(space, FederatedSettings(**{**base, **extra}), data,
                                           single_exit=method == "full_model_fedavg")
                row = data_row(method, name, seed, data, result, time.time() - t0, device, scale="small",
                               rounds=args.rounds, local_epochs=args.local_epochs)
                rows[row_key(row)] = row
                print_row(name, row)
                write(out, args, rows)


def demo_settings(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The demo config's federated settings for one data setting and seed (no checkpoint)."""
    from nni_fedexit.job.config import load_config

    base = load_config(DEMO_CONFIG).federated_settings().model_dump()
    base.update(checkpoint_dir=None, seed=seed, device=args.device, data_dir=args.data_dir, **DATA_SETTINGS[name])
    return base


def run_demo(args: argparse.Namespace, rows: dict[tuple, dict[str, Any]], out: Path) -> None:
    """The rows at the demo's size (see the module doc); data settings in the outer loop, so each
    setting's ``defaults`` row comes before the peer's equal-time row that takes its wall time."""
    from nni_fedexit.job.config import load_config

    spec = dict(load_config(DEMO_CONFIG).space)
    space = ResNetBlockPoolSpace.from_preset(spec.pop("preset"), **spec)
    methods = [m for m in (args.methods or DEMO_METHODS) if m in DEMO_METHODS]
    # defaults first: the peer's equal-time budget is their wall time
    methods = sorted(methods, key=lambda m: (m != "defaults", DEMO_METHODS.index(m)))
    device = device_name(args)
    central: dict[int, dict[str, Any]] = {}
    for name in args.settings:
        seeds = args.dirichlet_seeds if name.startswith("dirichlet") else [0]
        for seed in seeds:
            base = demo_settings(name, seed, args)
            data = FederatedData(FederatedSettings(**base))
            for method in methods:
                if (method in DEMO_OPTIONS or method == "clients_only") and (name not in args.option_partitions
                                                                            or seed != seeds[0]):
                    continue
                if method in ("full_model_fedavg", "central") and seed != seeds[0]:
                    continue
                if method == "previous_defaults" and name == "dirichlet0.1" and seed != seeds[0]:
                    continue
                budgets = args.budget if method == "peer_cnn_fedavg" else [None]
                for budget in budgets:
                    options: dict[str, Any] = {}
                    t0 = time.time()
                    if method == "peer_cnn_fedavg":
                        seconds = None
                        if budget == "equal_time":
                            ours = rows.get(row_key({"method": "defaults", "partition": base["partition"],
                                                     "alpha": DATA_SETTINGS[name].get("alpha"),
                                                     "classes_per_client": DATA_SETTINGS[name].get("classes_per_client"),
                                                     "seed": seed, "scale": "demo", "budget": None}))
                            if ours is None:
                                print(f"{name} seed {seed}: no defaults row to take the wall time of; run it first")
                                continue
                            seconds = ours["seconds"]
                        result = peer_fedavg(data, base["rounds"], base["local_epochs"], seed, seconds=seconds)
                    elif method == "central":
                        # as many images as the federated rounds train: rounds x clients a round x 1 epoch;
                        # the union of the clients' images does not depend on the partition: one training per seed
                        if seed not in central:
                            epochs = max(1, round(base["rounds"] * base["client_fraction"] * base["local_epochs"]))
                            trained = central_row(space, FederatedSettings(**{**base, **TODAY}), data, epochs,
                                                  DEMO_ARCHITECTURE)
                            central[seed] = {**trained, "seconds": time.time() - t0}
                        result = dict(central[seed])
                    else:
                        if method == "full_model_fedavg":
                            options = dict(TODAY)
                        elif method == "previous_defaults":
                            options = dict(PREVIOUS_DEFAULTS)
                        elif method in DEMO_OPTIONS:
                            options = {**PREVIOUS_DEFAULTS, **DEMO_OPTIONS[method]}
                        elif method == "clients_only":
                            options = dict(CLIENTS_ONLY)
                        result = federated_row(space, FederatedSettings(**{**base, **options}), data,
                                               single_exit=method == "full_model_fedavg", architecture=DEMO_ARCHITECTURE,
                                               as_the_demo=True)
                        options = {k: v for k, v in FederatedSettings(**{**base, **options}).model_dump().items()
                                   if k in REPORTED}
                    row = data_row(method, name, seed, data, result, time.time() - t0, device, scale="demo",
                                   budget=budget, rounds=result.pop("rounds", base["rounds"]),
                                   local_epochs=base["local_epochs"], client_fraction=base["client_fraction"],
                                   **({"options": options} if options else {}))
                    if budget is None:
                        row.pop("budget")
                    rows[row_key(row)] = row
                    print_row(name, row)
                    write(out, args, rows)


if __name__ == "__main__":
    main()
