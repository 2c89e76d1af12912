"""MkDocs hooks of this site (mkdocs.yml: ``hooks``).

``benchmarks/results/`` (the JSON and plots the benchmark scripts write) is served as
``results/`` without a copy in docs/, so the pages can link and show those files and
``mkdocs build --strict`` checks every such link.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files.append(File(f"results/{path.name}", str(RESULTS.parent), config["site_dir"],
                              config["use_directory_urls"]))
    return files
