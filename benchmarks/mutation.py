"""Mutation testing of the core with mutmut 3: does the suite fail when the maths breaks?

Each shard mutates one module of the core (the round engine, aggregators, objectives, checkpoint,
BatchNorm re-estimation, early-exit thresholds and runtime, controller, reward, decisions, reply
checks) and runs only the tests written for it, in its own copy of the tree under
``build/mutation/<shard>/`` (mutmut writes ``mutants/`` into the folder it runs in). mutmut forks
one child per mutant from a process that has imported everything once and runs only the tests
that reached the mutated function, so a shard fits this 2-core machine.

Mutants that cannot change behaviour are listed, each with its reason, in the table of
``docs/testing.md`` ("Equivalent mutants"); this script reads them from there, so the list and the
figures cannot drift apart. A listed mutant that no longer survives is an error (the list is
stale). Results: ``benchmarks/results/mutation.json``, one row per module.

    python benchmarks/mutation.py                  # every shard (``make mutation``)
    python benchmarks/mutation.py aggregators      # some shards
    python benchmarks/mutation.py --list           # shards, their modules and tests
    python benchmarks/mutation.py --survivors rounds   # each surviving mutant's diff
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutation"
RESULTS = ROOT / "benchmarks" / "results" / "mutation.json"
EQUIVALENT_DOC = ROOT / "docs" / "testing.md"
TARGET = 0.90
# what each shard's copy of the tree needs besides the package and the tests
ALSO_COPY = ["search_spaces", "strategies", "examples"]


@dataclass(frozen=True)
class Shard:
    """One module of the core and the test files written for it."""

    name: str
    module: str  # path of the mutated file, relative to the repository root
    tests: tuple[str, ...]


SHARDS = [
    Shard("rounds", "nni_fedexit/federated/rounds.py",
          ("tests/test_rounds.py", "tests/test_resume.py")),
    Shard("checkpoint", "nni_fedexit/federated/checkpoint.py",
          ("tests/test_resume.py", "tests/test_rounds.py")),
    Shard("aggregators_fedavg", "nni_fedexit/federated/aggregators/fedavg.py", ("tests/test_aggregators.py",)),
    Shard("aggregators_server_opt", "nni_fedexit/federated/aggregators/server_opt.py",
          ("tests/test_aggregators.py",)),
    Shard("objectives_multi_exit", "nni_fedexit/federated/objectives/multi_exit.py", ("tests/test_objectives.py",)),
    Shard("objectives_regularised", "nni_fedexit/federated/objectives/regularised.py", ("tests/test_objectives.py",)),
    Shard("objectives_label_skew", "nni_fedexit/federated/objectives/label_skew.py", ("tests/test_objectives.py",)),
    Shard("batchnorm", "nni_fedexit/federated/batchnorm.py", ("tests/test_batchnorm.py",)),
    Shard("thresholds", "nni_fedexit/exits/thresholds.py", ("tests/test_guarantee.py",)),
    Shard("runtime", "nni_fedexit/exits/runtime.py", ("tests/test_runtime.py",)),
    Shard("controller", "nni_fedexit/search/controller.py", ("tests/test_policy_gradient.py",)),
    Shard("controller_settings", "nni_fedexit/search/controller_settings.py", ("tests/test_policy_gradient.py",)),
    Shard("reward", "nni_fedexit/search/reward.py", ("tests/test_reward.py",)),
    Shard("profiler", "nni_fedexit/search/profiler.py", ("tests/test_reward.py",)),
    Shard("decisions", "nni_fedexit/search/decisions.py", ("tests/test_decisions.py",)),
    Shard("components", "nni_fedexit/components.py",
          ("tests/test_components.py", "tests/test_aggregators.py", "tests/test_config.py")),
    Shard("replies", "nni_fedexit/federated/backends/flower/replies.py", ("tests/test_replies.py",)),
]


def equivalent_mutants(doc: Path = EQUIVALENT_DOC) -> dict[str, str]:
    """Mutant name -> reason, from the table under ``## Equivalent mutants`` in docs/testing.md."""
    text = doc.read_text() if doc.exists() else ""
    section = text.split("## Equivalent mutants", 1)[1] if "## Equivalent mutants" in text else ""
    section = section.split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[0].endswith("`"):
            found[cells[0].strip("`")] = cells[-1]
    return found


def prepare(shard: Shard) -> Path:
    """A fresh copy of the tree for ``shard`` with mutmut's settings in its setup.cfg."""
    folder = WORK / shard.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ["nni_fedexit", "tests", *ALSO_COPY]:
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    missing = [t for t in shard.tests if not (ROOT / t).exists()]
    if missing:
        raise SystemExit(f"shard {shard.name}: test file(s) {missing} not found; fix SHARDS in {__file__}")
    config = (ROOT / "setup.cfg").read_text()
    config += "\n[mutmut]\nsource_paths = nni_fedexit\n"
    config += f"only_mutate = {shard.module}\n"
    config += "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in shard.tests)
    config += "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n"
    config += "also_copy =\n" + "".join(f"    {p}/\n" for p in ALSO_COPY)
    (folder / "setup.cfg").write_text(config)
    return folder


def run_shard(shard: Shard, children: int) -> float:
    """Run mutmut on one shard; returns the wall time in seconds."""
    folder = prepare(shard)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
               MPLBACKEND="Agg", CI="")
    start = time.monotonic()
    with open(folder / "mutmut.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)],
                              cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = (folder / "mutmut.log").read_text()[-3000:]
        raise SystemExit(f"shard {shard.name}: mutmut exited {proc.returncode}; log {folder / 'mutmut.log'}:\n{tail}")
    return seconds


def statuses(shard: Shard) -> dict[str, str]:
    """Mutant name -> mutmut's status, read from the ``.meta`` file mutmut keeps next to the mutant."""
    status_by_exit_code = _mutmut_statuses(WORK / shard.name)
    meta = WORK / shard.name / "mutants" / (shard.module + ".meta")
    if not meta.exists():
        raise SystemExit(f"shard {shard.name}: {meta} not found; run the shard first")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def summarise(shard: Shard, seconds: float | None, equivalent: dict[str, str]) -> dict:
    """The row of mutation.json for one shard."""
    status = statuses(shard)
    killed = sorted(n for n, s in status.items() if s in ("killed", "timeout"))
    alive = sorted(n for n, s in status.items() if s not in ("killed", "timeout"))
    stale = sorted(n for n in equivalent if n in killed)
    if stale:
        raise SystemExit(f"docs/testing.md lists {stale} as equivalent but the tests kill them: remove them")
    equal = [n for n in alive if n in equivalent]
    survived = [n for n in alive if n not in equivalent]
    scored = len(killed) + len(survived)
    row = {
        "module": shard.module,
        "mutants": len(status),
        "killed": len(killed),
        "survived": len(survived),
        "equivalent": len(equal),
        "timeout": sum(status[n] == "timeout" for n in killed),
        "no_tests": sum(status[n] == "no tests" for n in survived),
        "score": round(len(killed) / scored, 4) if scored else 1.0,
        "survivors": survived,
        "tests": list(shard.tests),
    }
    if seconds is not None:
        row["seconds"] = round(seconds, 1)
    return row


def show_survivors(shard: Shard) -> None:
    equivalent = equivalent_mutants()
    for name, status in sorted(statuses(shard).items()):
        if status not in ("killed", "timeout") and name not in equivalent:
            out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=WORK / shard.name,
                                 capture_output=True, text=True)
            print(f"# {name} ({status})\n{out.stdout.strip()}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="*", help="shard names (default: all)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2,
                        help="mutants tested at once (default: the cores)")
    parser.add_argument("--tests", nargs="+", help="run the shard(s) with these test files instead of their own")
    parser.add_argument("--list", action="store_true", help="print the shards and exit")
    parser.add_argument("--survivors", action="store_true", help="print the surviving mutants' diffs of the shards")
    parser.add_argument("--table", action="store_true", help="print docs/testing.md's results table from mutation.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite mutation.json from the last runs")
    args = parser.parse_args()
    by_name = {s.name: s for s in SHARDS}
    unknown = [n for n in args.shards if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown shard(s) {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in args.shards] or SHARDS
    if args.tests:
        chosen = [Shard(s.name, s.module, tuple(args.tests)) for s in chosen]
    if args.list:
        for s in chosen:
            print(f"{s.name:24} {s.module:50} {' '.join(s.tests)}")
        return
    if args.table:
        print(results_table(json.loads(RESULTS.read_text())))
        return
    if args.survivors:
        for s in chosen:
            show_survivors(s)
        return
    equivalent = equivalent_mutants()
    for shard in chosen:
        seconds = None if args.report_only else run_shard(shard, args.children)
        row = summarise(shard, seconds, equivalent)
        print(f"{shard.name:24} {row['killed']:4} killed {row['survived']:4} survived "
              f"{row['equivalent']:3} equivalent of {row['mutants']:4}: {row['score']:.1%}"
              + (f" in {seconds:.0f} s" if seconds is not None else ""), flush=True)
        rows = record(row)
    below = [r["module"] for r in rows.values() if r["score"] < TARGET]
    if below:
        print(f"below the {TARGET:.0%} target: {below}")


def results_table(results: dict) -> str:
    """The Markdown table of docs/testing.md's "Results" (tests/test_mutation_report.py checks it)."""
    lines = ["| module | mutants | killed | survived | equivalent | score | seconds |", "|---|---|---|---|---|---|---|"]
    for r in results["modules"]:
        lines.append(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['equivalent']} | "
                     f"{r['score']:.1%} | {r.get('seconds', '')} |")
    total = {k: sum(r[k] for r in results["modules"]) for k in ("mutants", "killed", "survived", "equivalent")}
    seconds = sum(r.get("seconds", 0) for r in results["modules"])
    lines.append(f"| all | {total['mutants']} | {total['killed']} | {total['survived']} | {total['equivalent']} | "
                 f"{total['killed'] / (total['killed'] + total['survived']):.1%} | {seconds:.0f} |")
    return "\n".join(lines)


def record(row: dict) -> dict[str, dict]:
    """Write ``row`` into mutation.json (under a lock: shards may run side by side)."""
    import fcntl

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = {r["module"]: r for r in json.loads(RESULTS.read_text())["modules"]} if RESULTS.exists() else {}
        if "seconds" not in row and "seconds" in rows.get(row["module"], {}):
            row["seconds"] = rows[row["module"]]["seconds"]
        rows[row["module"]] = row
        order = {s.module: i for i, s in enumerate(SHARDS)}
        RESULTS.write_text(json.dumps({
            "tool": "mutmut " + _mutmut_version(),
            "target": TARGET,
            "cpus": os.cpu_count(),
            "modules": sorted(rows.values(), key=lambda r: order.get(r["module"], len(order))),
        }, indent=1) + "\n")
    return rows


def _mutmut_statuses(folder: Path) -> dict:
    """mutmut's own exit code -> status table (importing it reads the shard's setup.cfg)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        from mutmut.__main__ import status_by_exit_code
    finally:
        os.chdir(cwd)
    return status_by_exit_code


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


if __name__ == "__main__":
    main()
