"""``benchmarks/RESULTS.md``: each benchmark script owns sections delimited by HTML comment markers."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table: the header, its separator, then one line per row of formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def write_section(tag: str, lines: list[str]) -> None:
    """Replace the ``<!-- tag -->`` ... ``<!-- /tag -->`` section of RESULTS.md with ``lines``, or append it.

    Text outside the markers (hand-written notes) is kept.
    """
    begin, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    section = "\n".join([begin, *lines, end]) + "\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", flags=re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
