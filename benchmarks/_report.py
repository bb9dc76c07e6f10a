"""Append benchmark results to docs/benchmarks.md: one section per benchmark, one table row per run."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
INTRO = ("# Benchmarks\n\nEvery number here was appended by a script in `benchmarks/` (`make bench` runs them all);\n"
         "each row names the command that reproduces it. Ratios are measured side by side in one run.\n")


def key_values(defaults: dict[str, str]) -> dict[str, str]:
    """``key=value`` command-line arguments over ``defaults``."""
    out = dict(defaults)
    for arg in sys.argv[1:]:
        key, _, value = arg.partition("=")
        out[key] = value
    return out


def machine() -> str:
    return f"{os.cpu_count()} CPUs {platform.machine()}"


def append_row(section: str, columns: list[str], values: list[str], note: str = "", path: Path = DOC) -> None:
    """Add a row (prefixed with today's date) to the table under ``## section``, creating both if needed."""
    cols = ["date", *columns]
    row = "| " + " | ".join([time.strftime("%Y-%m-%d"), *values]) + " |"
    text = path.read_text() if path.exists() else INTRO
    marker = f"## {section}\n"
    if marker not in text:
        block = f"\n{marker}\n" + (f"{note}\n\n" if note else "")
        block += "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        text = text.rstrip("\n") + "\n" + block
    head, _, tail = text.partition(marker)
    lines = tail.split("\n")
    end = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    last_row = max(i for i, line in enumerate(lines[:end]) if line.startswith("|"))
    lines.insert(last_row + 1, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + marker + "\n".join(lines))
