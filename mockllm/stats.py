"""What the mock counts for GET /stats: calls, statuses, faults, prompts, the busiest window, stalls.

Usage::

    stats = MockStats()
    stats.record(time.time(), 200, prompt)
    stats.summary(with_log=True)["max_per_second"]
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

_LOG_MAX = 1_000_000


@dataclass
class MockStats:
    calls: int = 0
    ok: int = 0
    authorized: int = 0  # calls that carried an Authorization header
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    by_fault: collections.Counter[str] = field(default_factory=collections.Counter)
    prompts: collections.Counter[str] = field(default_factory=collections.Counter)
    times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_LOG_MAX))
    statuses: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=_LOG_MAX))
    entries: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=_LOG_MAX))
    stalls: collections.deque[tuple[float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=_LOG_MAX))

    def record(self, when: float, status: int, prompt: str | None = None, fault: str = "",
               retry_after: float | None = None) -> None:
        """One call: status 0 when no HTTP answer was sent (hang, reset)."""
        self.calls += 1
        self.by_status[status] += 1
        if fault:
            self.by_fault[fault] += 1
        self.times.append(when)
        self.statuses.append(status)
        self.entries.append({"t": when, "status": status, "fault": fault,
                             "retry_after": retry_after, "prompt": prompt})

    def summary(self, with_log: bool = False) -> dict[str, Any]:
        """Counts; with_log adds every call's (time, status), the prompts called twice and
        ``calls``: each call's time (arrival), status, fault, Retry-After sent and prompt."""
        dup = sum(n - 1 for n in self.prompts.values() if n > 1)
        return {
            "calls": self.calls,
            "ok": self.ok,
            "authorized": self.authorized,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_fault": dict(self.by_fault),
            "distinct_prompts": len(self.prompts),
            "duplicate_calls": dup,
            "max_per_second": max_in_window(list(self.times), 1.0),
            "first_call": self.times[0] if self.times else None,
            "last_call": self.times[-1] if self.times else None,
            "stalls": len(self.stalls),
            **({"log": list(zip(self.times, self.statuses, strict=False)),
                "stalls_log": list(self.stalls),
                "duplicate_prompts": [p for p, n in self.prompts.items() if n > 1],
                "calls_log": list(self.entries)}
               if with_log else {}),
        }


def max_in_window(times: list[float], width: float) -> int:
    """The most of the sorted ``times`` within any window of ``width`` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
