"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``) that shows the package's
reST-flavoured docstrings well as Markdown, without changing them in the source:

- Sphinx roles (``:class:`~a.b.C```, ``:func:`f```) become code (``C``, ``f``);
- a paragraph laid out in columns (``config.py    RunConfig: ...``, the module docstrings'
  file lists) is shown as preformatted text, so its alignment and line breaks stay;
- ``<`` outside code is escaped (``runs/<config name>`` would otherwise be read as HTML);
- a reST literal-block marker ``::`` at the end of a line becomes ``:``.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|data|exc|const):`(~?)([^`]+)`")
CODE = re.compile(r"(`+)(.+?)\1", re.S)
COLUMNS = re.compile(r"\S {2,}\S")
BULLET = re.compile(r"\s*([-*+]|\d+\.)\s")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _escape_outside_code(text: str) -> str:
    out, last = [], 0
    for m in CODE.finditer(text):
        out.append(text[last:m.start()].replace("<", "&lt;"))
        out.append(m.group(0))
        last = m.end()
    out.append(text[last:].replace("<", "&lt;"))
    return "".join(out)


def _is_code(lines: list[str]) -> bool:
    return all(not line.strip() or line.startswith("    ") for line in lines)


def _is_columns(lines: list[str]) -> bool:
    return not BULLET.match(lines[0]) and any(COLUMNS.search(line.strip()) for line in lines)


def to_markdown(text: str) -> str:
    text = ROLE.sub(_role, text)
    blocks = re.split(r"\n[ \t]*\n", text)
    out = []
    for block in blocks:
        lines = block.split("\n")
        if _is_code(lines):
            out.append(block)
        elif _is_columns(lines):
            plain = CODE.sub(lambda m: m.group(2), block)
            out.append("```text\n" + plain + "\n```")
        else:
            block = re.sub(r"::[ \t]*$", ":", block, flags=re.M)
            out.append(_escape_outside_code(block))
    return "\n\n".join(out)


class RstRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
