"""The mutation results and their page cannot drift apart: docs/testing.md shows exactly the figures
of benchmarks/results/mutation.json, and its list of equivalent mutants is the one the figures used."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation.json"
PAGE = ROOT / "docs" / "testing.md"


def _harness():
    """benchmarks/mutation.py, imported once (its dataclass needs it in sys.modules)."""
    if "mutation_harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mutation_harness", ROOT / "benchmarks" / "mutation.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["mutation_harness"] = module
        spec.loader.exec_module(module)
    return sys.modules["mutation_harness"]


def test_equivalent_mutants_are_read_from_the_table(tmp_path: Path) -> None:
    """Only rows of the "Equivalent mutants" section count, each with its last cell as the reason."""
    page = tmp_path / "testing.md"
    page.write_text("# Testing\n\n| `a.x_f__mutmut_1` | not this section |\n\n"
                    "## Equivalent mutants\n\n| mutant | reason |\n|---|---|\n"
                    "| `a.x_f__mutmut_2` | the bound is never 0 |\n| `a.x_g__mutmut_7` | a tie in the sort key |\n\n"
                    "## Next\n\n| `a.x_h__mutmut_3` | after the section |\n")
    assert _harness().equivalent_mutants(page) == {
        "a.x_f__mutmut_2": "the bound is never 0", "a.x_g__mutmut_7": "a tie in the sort key"}


def test_every_shard_module_exists_and_has_its_tests() -> None:
    """A shard names a real module and test files that exist, so `make mutation` cannot silently skip one."""
    for shard in _harness().SHARDS:
        assert (ROOT / shard.module).is_file(), shard
        assert shard.tests and all((ROOT / t).is_file() for t in shard.tests), shard


def test_page_shows_the_recorded_figures() -> None:
    """docs/testing.md's results table has one row per module of mutation.json with its figures."""
    results = json.loads(RESULTS.read_text())
    page = PAGE.read_text()
    shards = {s.module for s in _harness().SHARDS}
    assert {r["module"] for r in results["modules"]} == shards, "mutation.json lacks a shard: run make mutation"
    for row in results["modules"]:
        want = (f"| `{row['module']}` | {row['mutants']} | {row['killed']} | {row['survived']} | "
                f"{row['equivalent']} | {row['score']:.1%} |")
        assert want in page, f"docs/testing.md lacks the row {want!r}"


def test_equivalent_list_is_the_one_the_figures_used() -> None:
    """Each module's count of equivalent mutants equals the page's list for that module."""
    listed = _harness().equivalent_mutants(PAGE)
    for row in json.loads(RESULTS.read_text())["modules"]:
        prefix = row["module"].removesuffix(".py").replace("/", ".") + "."
        names = [n for n in listed if n.startswith(prefix)]
        assert len(names) == row["equivalent"], (row["module"], names)
        assert all(re.fullmatch(r"[\w.]+__mutmut_\d+", n) for n in names), names
        assert all(len(listed[n]) > 10 for n in names), "each equivalent mutant needs its reason"
