"""The reliability table: rendered from the fault suite's rows, written into the README.

Usage::

    python -m tests.faults.report RESULTS.json README.md

replaces what stands between ``<!-- faults:begin -->`` and ``<!-- faults:end -->``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BEGIN = "<!-- faults:begin -->"
END = "<!-- faults:end -->"
COLUMNS = ("scenario", "requests", "outputs", "lost", "duplicates", "in flight at kills",
           "upstream duplicate calls", "stalled partitions", "time", "notes")


def _cells(row: Any) -> list[str]:
    def get(k: str) -> Any:
        if isinstance(row, dict):
            return row.get(k, 0)  # results written before a column existed
        return getattr(row, k)

    def count(k: str) -> str:
        value = row.get(k) if isinstance(row, dict) else getattr(row, k)
        return "-" if value is None else f"{value:,}"  # None: no worker was killed

    counts = [f"{get(k):,}" for k in ("requests", "outputs", "lost", "duplicates")]
    counts += [count("in_flight_at_kills")]
    counts += [f"{get(k):,}" for k in ("upstream_duplicates", "stalled")]
    return [str(get("scenario")), *counts, f"{get('seconds'):.0f} s", str(get("notes"))]


def _order(row: Any) -> tuple[int, str]:
    name = str(row["scenario"] if isinstance(row, dict) else row.scenario)
    number = name.split(" ", 1)[0]
    return (int(number) if number.isdigit() else 99, name)


def render(rows: Iterable[Any]) -> str:
    """A Markdown table of the rows (``Row`` objects or their dicts), by scenario number."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in sorted(rows, key=_order)]
    return "\n".join(lines)


def write_readme(readme: Path, rows: list[dict[str, Any]]) -> None:
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: markers {BEGIN} / {END} not found")
    sizes = sorted({r.get("size", "?") for r in rows})
    head = (f"`FAULTS_SIZE={'/'.join(sizes)}`, {time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()} with {_cores()} cores, shared with other work:")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{BEGIN}\n{head}\n\n{render(rows)}\n{END}{after}", encoding="utf-8")


def _cores() -> int:
    return os.cpu_count() or 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.faults.report RESULTS.json README.md", file=sys.stderr)
        return 2
    rows = json.loads(Path(argv[0]).read_text())
    write_readme(Path(argv[1]), rows)
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
