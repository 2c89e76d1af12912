"""The documentation: the mkdocs site builds with --strict (no broken link, anchor, page or API
reference), and the README stays a short first page that shows the two commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 12_000


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed (exit {proc.returncode}):\n{output}"
    assert (tmp_path / "site" / "index.html").is_file(), output
    assert (tmp_path / "site" / "api" / "search.html").is_file(), output
    # the configuration page is written from the settings models and includes the demo config itself
    page = (tmp_path / "site" / "configuration.html").read_text()
    assert "federated.aggregator" in page and "beta_1" in page and "<!-- config-reference -->" not in page
    assert "a round costs a tenth of the data" in page  # a comment of examples/fmnist_quickstart.yaml
    # the API reference shows the settings models' fields with their descriptions
    assert "federated rounds to run" in (tmp_path / "site" / "api" / "federated.html").read_text()


def test_readme_is_short_and_shows_the_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters; keep it at most {README_LIMIT}"
    assert "make demo" in text
    assert "make test" in text
    assert "make docs" in text


def test_readme_links_exist() -> None:
    """Every relative link and image of the README names a file of the repository."""
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "the README links to no docs page"
    missing = []
    for target in targets:
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to missing files: {missing}"
