"""Priority scheduler: order by priority, FIFO within a level, aging bounds overtaking."""

from __future__ import annotations

from streams.dispatch.scheduler import Scheduler


def _drain_order(sched: Scheduler[str]) -> list[str]:
    out = []
    while (entry := sched.peek()) is not None:
        sched.discard(entry)
        out.append(entry.item)
    return out


def test_priority_then_fifo_without_aging() -> None:
    sched: Scheduler[str] = Scheduler(aging_ms=0)
    sched.add("9a", 9, 0)
    sched.add("0a", 0, 10)
    sched.add("5a", 5, 20)
    sched.add("0b", 0, 30)
    sched.add("9b", 9, 40)
    assert _drain_order(sched) == ["0a", "0b", "5a", "9a", "9b"]


def test_fifo_within_a_level_with_aging() -> None:
    sched: Scheduler[str] = Scheduler(aging_ms=1000)
    for i in range(20):
        sched.add(f"r{i}", 4, i * 7)
    assert _drain_order(sched) == [f"r{i}" for i in range(20)]


def test_one_level_per_aging_period() -> None:
    sched: Scheduler[str] = Scheduler(aging_ms=100)
    sched.add("old9", 9, 0)  # worth priority 0 at t=900
    sched.add("p0-early", 0, 850)
    sched.add("p0-late", 0, 950)
    assert _drain_order(sched) == ["p0-early", "old9", "p0-late"]


def test_aging_prevents_starvation() -> None:
    # A stream of priority-0 arrivals, one served per tick, more arriving than served:
    # without aging the priority-9 request would wait forever; with it, only requests that
    # arrived less than 9 x aging_ms after it overtake it (2 per tick x 900 ticks).
    for aging_ms, bound in ((100, 1802), (0, None)):
        sched: Scheduler[str] = Scheduler(aging_ms=aging_ms)
        sched.add("low", 9, 0)
        served_at = None
        for tick in range(5000):  # 1 ms per tick
            sched.add(f"hi{tick}", 0, tick)
            sched.add(f"hi{tick}b", 0, tick)
            entry = sched.peek()
            assert entry is not None
            sched.discard(entry)
            if entry.item == "low":
                served_at = tick
                break
        if bound is None:
            assert served_at is None
        else:
            assert served_at is not None and served_at <= bound


def test_depth_discard_and_passes() -> None:
    sched: Scheduler[str] = Scheduler(aging_ms=0)
    entries = {name: sched.add(name, p, i) for i, (name, p) in enumerate(
        [("a", 1), ("b", 1), ("c", 3), ("d", 0)]
    )}
    assert len(sched) == 4 and sched.depth()[1] == 2 and sched.depth()[0] == 1
    sched.discard(entries["b"])
    sched.discard(entries["b"])  # idempotent
    assert len(sched) == 3 and sched.depth()[1] == 1

    cursor = sched.begin_pass()
    seen = []
    while (e := cursor.next()) is not None:
        seen.append(e.item)
        if e.item == "a":
            cursor.take(e)
        else:
            cursor.skip(e)
    cursor.end()
    assert seen == ["d", "a", "c"]
    assert len(sched) == 2
    assert sched.drain() == ["d", "c"]
    assert len(sched) == 0 and sum(sched.depth()) == 0


def test_many_cancellations_compact_the_heap() -> None:
    sched: Scheduler[int] = Scheduler(aging_ms=10)
    entries = [sched.add(i, i % 10, i) for i in range(1000)]
    for e in entries[:990]:
        sched.discard(e)
    assert len(sched._heap) < 200
    assert sorted(sched.drain()) == list(range(990, 1000))
