"""Small statistics helpers: percentiles, median/min/max over runs, peak overlap."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return float(s[k])


def spread(values: Iterable[float | None]) -> dict[str, Any] | None:
    """Median and min-max of the runs' figures (None figures are left out)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": len(vals)}


def peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of [start, end] intervals open at one time."""
    events: list[tuple[float, int]] = []
    for a, b in intervals:
        events.append((a, 1))
        events.append((b, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """For every numeric key seen in any run: median, min, max over the runs."""
    keys: list[str] = []
    for r in runs:
        for k, v in r.items():
            if k not in keys and (isinstance(v, int | float) and not isinstance(v, bool)):
                keys.append(k)
    out: dict[str, Any] = {}
    for k in keys:
        s = spread(r.get(k) for r in runs)
        if s is not None:
            out[k] = s
    return out
