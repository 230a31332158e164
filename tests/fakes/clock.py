"""A clock the test moves by hand: ``clock.now += 1.5``."""

from __future__ import annotations


class Clock:
    """Returns ``now`` (seconds; epoch-like by default, so deadlines in ms make sense)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
