"""MkDocs hooks of this site (mkdocs.yml: ``hooks``).

``benchmarks/results/`` (the JSON and plots the benchmark scripts write) is served as
``results/`` without a copy in docs/, so the pages can link and show those files and
``mkdocs build --strict`` checks every such link.
"""

from __future__ import annotations

import re
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


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Pages that cannot drift from the code: ``<!-- config-reference -->`` becomes the reference
    written from the settings models (nni_fedexit.job.config_reference), and
    ``<!-- file: PATH -->`` the file at PATH (from the repository's root) as a code block."""
    if "<!-- config-reference -->" in markdown:
        from nni_fedexit.job.config_reference import reference_markdown

        markdown = markdown.replace("<!-- config-reference -->", reference_markdown())

    def include(match: re.Match) -> str:
        path = ROOT / match.group(1)
        return f"```{path.suffix.lstrip('.') or 'text'}\n{path.read_text().rstrip()}\n```"

    return re.sub(r"<!-- file: (\S+) -->", include, markdown)
