"""Scale-out on real Fashion-MNIST: round time, memory and traffic against the number of clients.

Both backends a user would choose between, on the same data and the same work: the in-process
``simulation`` (its ``workers`` threads) and ``flower-simulation`` (our ServerApp and ClientApp
on Flower's simulation engine: ``workers`` Ray actors of one CPU each), at 10, 100 and 1,000
clients, with 1 and 2 workers. Every client holds ``--per-client`` training images (1,000
clients: 48,000, the whole training pool) and each round trains ``--per-round`` of them, so a
round is the same work at every size. Each row runs in a fresh process:

- ``round_seconds``: the median of rounds 2.. (round 1 also builds the model in every actor);
- ``peak_rss_mib``: the peak, sampled every 0.3 s, of the resident memory of the process and
  all its children (Ray's GCS, raylet and actors), loading of the data set included, with shared
  pages (Ray's object store, libraries) counted once: the sum of their PSS;
  ``peak_rss_sum_mib`` is the plain sum of their RSS, which counts shared pages once per process;
- ``bytes_per_round``: the weights moved per round, out and back (Flower: the ArrayRecords of its
  messages; in-process: the tensors handed over).

Writes ``results/scale.json``.

    python benchmarks/scale.py                       # all rows (about 15 minutes on 2 cores)
    python benchmarks/scale.py --device cuda --per-round 100 --gpu-fraction 0.1   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = {"stage1": "resnet18", "stage2": "resnet50", "stage3": "resnet18"}


class TreeMemory:
    """Peak memory of this process and its descendants, sampled in a thread: the sum of their
    PSS (shared pages, such as Ray's object store, counted once) and the plain sum of their RSS."""

    def __init__(self, every: float = 0.3):
        import psutil

        self.me = psutil.Process()
        self.every = every
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        pss = rss = 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            pss, rss = pss + info.pss, rss + info.rss
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_row(args: argparse.Namespace) -> dict:
    """One backend, client count and worker count, in this process."""
    with TreeMemory() as memory:
        import torch

        from nni_fedexit import ResNetBlockPoolSpace
        from nni_fedexit.federated import FederatedSettings, federate
        from nni_fedexit.federated.rounds import stable_seed

        backend = {"name": args.backend, "workers": args.workers}
        if args.backend == "flower-simulation":
            backend["client_num_gpus"] = args.gpu_fraction
        settings = FederatedSettings(
            backend=backend, rounds=args.rounds, num_clients=args.clients,
            client_fraction=min(1.0, args.per_round / args.clients), min_clients=min(2, args.clients),
            client_samples=args.per_client * args.clients, val_samples=1000, test_samples=1000, bn_samples=500,
            local_epochs=args.epochs, batch_size=16, client_threads=1, device=args.device, seed=0,
        )
        space = ResNetBlockPoolSpace.from_preset("resnet_pool", widths=args.widths)
        arch = {label: ARCH.get(label, "resnet18") for label in space.labels}
        torch.manual_seed(stable_seed(0))
        network = space.build(arch)
        network.arch = arch
        started = time.time()
        result = federate(network, settings, report=False)
        total = time.time() - started
    history = result.history
    later = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    return {
        "backend": args.backend, "clients": args.clients,
        "clients_per_round": len(history[-1]["clients"]), "workers": args.workers,
        "round_seconds": round(statistics.median(later), 3),
        "peak_rss_mib": round(memory.peak_pss / 2**20, 1),
        "peak_rss_sum_mib": round(memory.peak_rss / 2**20, 1),
        "bytes_per_round": int(statistics.mean(h["bytes_sent"] + h["bytes_received"] for h in history)),
        "first_round_seconds": round(history[0]["seconds"], 3), "run_seconds": round(total, 1),
        "device": args.device,
        "val_accuracy_last_exit": round(history[-1]["exit_accuracy"][-1], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["simulation", "flower-simulation"])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--per-client", type=int, default=48, help="training images of each client")
    parser.add_argument("--per-round", type=int, default=10, help="clients trained per round")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="stage widths of the network")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-fraction", type=float, default=0.0, help="flower-simulation: GPU share of each client")
    parser.add_argument("--row", action="store_true", help="run one row (--backends, --clients, --workers: one each)")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = parser.parse_args()

    if args.row:
        args.backend, args.clients, args.workers = args.backends[0], args.clients[0], args.workers[0]
        print("ROW " + json.dumps(one_row(args)), flush=True)
        return

    rows = []
    for backend in args.backends:
        for clients in args.clients:
            for workers in args.workers:
                cmd = [sys.executable, __file__, "--row", "--backends", backend, "--clients", str(clients),
                       "--workers", str(workers), "--per-client", str(args.per_client), "--per-round",
                       str(args.per_round), "--epochs", str(args.epochs), "--rounds", str(args.rounds), "--widths", *map(str, args.widths),
                       "--device", args.device, "--gpu-fraction", str(args.gpu_fraction)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
                if out.returncode != 0 or not line:
                    raise SystemExit(f"{backend} {clients} clients {workers} workers failed:\n{out.stderr[-4000:]}")
                rows.append(json.loads(line[0][4:]))
                print(json.dumps(rows[-1]), flush=True)

    def find(backend: str, clients: int, workers: int) -> dict | None:
        return next((r for r in rows if (r["backend"], r["clients"], r["workers"]) == (backend, clients, workers)), None)

    checks = {}
    for backend in args.backends:
        small, big = find(backend, min(args.clients), 1), find(backend, max(args.clients), 1)
        if small and big:
            checks[f"{backend}: peak memory at {big['clients']} / at {small['clients']} clients"] = round(
                big["peak_rss_mib"] / small["peak_rss_mib"], 3)
        for clients in args.clients:
            one, two = find(backend, clients, 1), find(backend, clients, 2)
            if one and two:
                checks[f"{backend}: round time 2 workers / 1 worker at {clients} clients"] = round(
                    two["round_seconds"] / one["round_seconds"], 3)
    result = {
        "what": "round time, peak memory and traffic against clients and workers (benchmarks/scale.py)",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, device {args.device}",
        "settings": {k: getattr(args, k) for k in ("per_client", "per_round", "epochs", "rounds", "widths", "gpu_fraction")},
        "network": ARCH, "rows": rows, "ratios": checks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(checks, indent=2))


if __name__ == "__main__":
    main()
