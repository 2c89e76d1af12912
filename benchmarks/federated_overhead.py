"""What the federated simulation costs on top of plain PyTorch.

1. Throughput: one simulated client's local training (load the global weights into the client
   model, take its branch, train, copy the update out, check and add it to the aggregate) against
   a bare PyTorch loop training the same branch on the same data with the same optimiser.
   Reports images/s of both and their ratio (best of ``--repeats``).
2. Memory: peak resident memory of a process that loads the data and runs one round with 10
   clients, and one with 100 clients (same data in total), each in a fresh process.

Writes ``results/federated_overhead.json``.

    python benchmarks/federated_overhead.py
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _network():
    from nni_fedexit import ResNetBlockPoolSpace

    space = ResNetBlockPoolSpace.from_preset("resnet_pool")
    torch.manual_seed(0)
    return space.build({"stage1": "resnet18", "stage2": "resnet50", "stage3": "resnet18", "stage4": "resnet50"})


def throughput(samples: int, epochs: int, repeats: int) -> dict:
    import torch.nn.functional as F

    from nni_fedexit.data import load_dataset
    from nni_fedexit.exits import MultiExitNetwork
    from nni_fedexit.federated import ClientTask, LocalSettings, SimulationBackend, WeightedMean

    data = load_dataset("fashion-mnist")
    client = data.train.subset(range(samples))
    model = MultiExitNetwork.from_network(_network(), head="conv")
    local = LocalSettings(epochs=epochs, batch_size=32)
    depth = model.num_exits

    def simulated() -> float:
        backend = SimulationBackend(model, [client], local, all_exits=True)
        state = model.state_dict()
        acc = WeightedMean(state)
        t = time.perf_counter()
        backend.run_round(state, [ClientTask(0, depth, 0.05, 0)], lambda task, u: acc.add(u.state, u.num_samples),
                          lambda task, err: (_ for _ in ()).throw(err))
        acc.result()
        return time.perf_counter() - t

    def bare() -> float:
        net = copy.deepcopy(model)
        branch = net.branch(depth, all_exits=True)
        opt = torch.optim.SGD(branch.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        branch.train()
        for _ in range(epochs):
            order = torch.randperm(len(client), generator=g)
            for i in range(0, len(client), 32):
                idx = order[i:i + 32]
                loss = sum(F.cross_entropy(z, client.labels[idx]) for z in branch(client.images[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return time.perf_counter() - t

    sim = min(simulated() for _ in range(repeats))
    ref = min(bare() for _ in range(repeats))
    images = samples * epochs
    return {"samples": samples, "epochs": epochs, "branch_depth": depth, "repeats": repeats,
            "simulation_images_per_s": images / sim, "bare_pytorch_images_per_s": images / ref,
            "simulation_over_bare_time_ratio": sim / ref}


def peak_memory_child(clients: int, samples: int) -> None:
    """Runs in a fresh process: one round with ``clients`` clients; prints peak RSS in MiB."""
    from nni_fedexit.federated import FederatedData, FederatedSettings, federate

    s = FederatedSettings(rounds=1, num_clients=clients, client_samples=samples, val_samples=500,
                          test_samples=500, local_epochs=1)
    data = FederatedData(s)
    after_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    federate(_network(), s, data=data, report=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"clients": clients, "peak_rss_mib": peak, "peak_rss_after_loading_data_mib": after_data}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-samples", type=int, default=4000)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child is not None:
        peak_memory_child(args.child, args.memory_samples)
        return
    result = {"threads": torch.get_num_threads(), "throughput": throughput(args.samples, args.epochs, args.repeats)}
    print(json.dumps(result["throughput"], indent=1), flush=True)
    result["memory"] = []
    for clients in (10, 100):
        out = subprocess.run([sys.executable, __file__, "--child", str(clients), "--memory-samples", str(args.memory_samples)],
                             capture_output=True, text=True, check=True)
        result["memory"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(result["memory"][-1], flush=True)
    result["memory_samples"] = args.memory_samples
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federated_overhead.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
