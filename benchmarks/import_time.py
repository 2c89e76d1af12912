"""What importing costs: wall time of fresh interpreters, median of 5, next to ``import torch`` and
``import nni`` in the same run.

Targets (issue 34): ``nni-fedexit --help`` under 1 s; everything NNI's dispatcher runs before the
tuner connects (import the tuner module, build the tuner) under a third of its 10-s window; the
maths modules load no ``nni`` module (tests/test_imports.py checks that on every test run).

    python benchmarks/import_time.py                      # this checkout -> benchmarks/results/import_time.json
    python benchmarks/import_time.py --source OLD --label before --out /tmp/before.json   # another checkout

``--source`` is a checkout whose ``nni_fedexit`` goes first on PYTHONPATH (this venv's packages
otherwise), so two versions compare on one machine in one sitting. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "import_time.json"

#: (name, Python code) each run in a fresh interpreter; the probe after it says what got loaded
TARGETS = [
    ("python (empty)", "pass"),
    ("import torch", "import torch"),
    ("import nni", "import nni"),
    ("import nni_fedexit", "import nni_fedexit"),
    ("nni-fedexit --help", "import sys\nfrom nni_fedexit.job.cli import main\nsys.argv = ['nni-fedexit', '--help']\n"
                           "try:\n    main()\nexcept SystemExit:\n    pass"),
    ("tuner: import + build (before the dispatcher connects)",
     "from nni_fedexit.search.tuner import SizeAwarePGTuner\nSizeAwarePGTuner(beta=14, baseline_params=700000)"),
    ("maths modules (aggregators, objectives, rounds, thresholds, reward, controller)",
     "import nni_fedexit.federated.aggregators.server_opt, nni_fedexit.federated.objectives.regularised, "
     "nni_fedexit.federated.objectives.label_skew, nni_fedexit.federated.rounds, nni_fedexit.exits.thresholds, "
     "nni_fedexit.search.reward, nni_fedexit.search.controller"),
    ("Flower ClientApp module", "import nni_fedexit.federated.backends.flower.client_app"),
]
PROBE = ("\nimport json, sys\nprint('@@' + json.dumps({top: sum(1 for m in sys.modules if m == top or m.startswith(top + '.'))"
         " for top in ('torch', 'nni', 'pytorch_lightning', 'flwr')}))")


def measure(code: str, source: Path, repeats: int) -> dict:
    """Wall time of ``python -c code`` (interpreter start included), ``repeats`` times, and the
    modules it loaded (from the last run)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]),
               PYTHONDONTWRITEBYTECODE="0")
    runs, loaded = [], {}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=source, capture_output=True, timeout=600)  # warm the disk cache
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code + PROBE], env=env, cwd=source, capture_output=True, text=True,
                             timeout=600)
        runs.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"{code!r} failed:\n{out.stderr[-2000:]}")
        loaded = json.loads(next(line[2:] for line in out.stdout.splitlines() if line.startswith("@@")))
    return {"median_s": round(statistics.median(runs), 3), "runs_s": [round(r, 3) for r in runs], "modules_loaded": loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose nni_fedexit is measured")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    for name, code in TARGETS:
        row = {"what": name, "code": code, **measure(code, args.source.resolve(), args.repeats)}
        rows.append(row)
        print(f"{name:80s} {row['median_s']:6.2f} s  loads {row['modules_loaded']}", flush=True)
    commit = subprocess.run(["git", "-C", str(args.source), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"benchmark": "import_time", "label": args.label, "commit": commit, "repeats": args.repeats,
              "statistic": "median wall time of a fresh interpreter, start included", "cpus": os.cpu_count(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
