"""Memory per tracked record in the ack tracker, measured with tracemalloc.

Usage::

    python -m bench.tracker_memory [N] [VALUE_BYTES]

Tracks N records of one partition the way the worker does (faust's Message with its key and
value dropped), the first one unfinished and every other one finished behind it (the case
``limits.max_tracked`` bounds), and prints the bytes per record; then the same with the
record's value kept (what a tracker holding the event would cost).
"""

from __future__ import annotations

import sys
import tracemalloc
from typing import Any

from faust.types import TP
from faust.types.tuples import Message

from streams.intake.acks import AckTracker


def _message(offset: int, value: bytes | None) -> Message:
    return Message("llm.requests", 0, offset, 1.0, 0, [], b"key-%d" % offset if value else None,
                   value, None, tp=TP("llm.requests", 0))


def per_record(n: int, value_bytes: int, keep_value: bool) -> float:
    """Bytes allocated per tracked record (message and tracker entry)."""
    tp = TP("llm.requests", 0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracker: AckTracker[Any] = AckTracker()
    for off in range(n):
        value = bytes(value_bytes) if keep_value else None  # a distinct object per record
        tracker.add(tp, off, _message(off, value))
    for off in range(1, n):
        tracker.finish(tp, off)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(tracker) == n
    return (after - before) / n


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 100_000
    value_bytes = int(argv[1]) if len(argv) > 1 else 1024
    dropped = per_record(n, value_bytes, keep_value=False)
    kept = per_record(n, value_bytes, keep_value=True)
    print(f"{n:,} tracked records (1 in flight, {n - 1:,} finished behind it)")
    print(f"  as the worker keeps them (key and value dropped): {dropped:,.0f} bytes per record")
    print(f"  with a {value_bytes:,}-byte value kept:              {kept:,.0f} bytes per record")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
