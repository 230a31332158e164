"""The fair queue: weighted shares between tenants within a level, FIFO within a tenant,
priority and aging across levels, skips restored, state bounded."""

from __future__ import annotations

from collections import Counter

from streams.dispatch.fairqueue import FairQueue


def _serve(fq: FairQueue[str], n: int) -> list[str]:
    """Grant ``n`` entries best-first, one pass each (as the pump does under a rate limit)."""
    out = []
    for _ in range(n):
        cursor = fq.begin_pass()
        entry = cursor.next()
        if entry is None:
            cursor.end()
            break
        cursor.take(entry)
        cursor.end()
        out.append(entry.item)
    return out


def test_one_tenant_alone_is_fifo_and_gets_everything() -> None:
    fq: FairQueue[str] = FairQueue(aging_ms=0)
    for i in range(5):
        fq.add(f"a{i}", 5, float(i), "a")
    assert _serve(fq, 10) == ["a0", "a1", "a2", "a3", "a4"]
    assert len(fq) == 0


def test_a_small_tenant_behind_a_flood_waits_one_grant_not_the_flood() -> None:
    fq: FairQueue[str] = FairQueue(aging_ms=10_000)
    for i in range(10_000):
        fq.add(f"a{i}", 5, 0.0, "a")
    assert _serve(fq, 100)[-1] == "a99"
    fq.add("b0", 5, 1.0, "b")
    fq.add("b1", 5, 2.0, "b")
    served = _serve(fq, 4)
    assert "b0" in served[:2] and served.index("b1") <= 3
    assert [s for s in served if s.startswith("a")] == ["a100", "a101"]  # A keeps its order


def test_equal_weights_share_equally_and_3_to_1_weights_share_three_quarters() -> None:
    for weights, share in (({"a": 1.0, "b": 1.0}, 0.5), ({"a": 3.0, "b": 1.0}, 0.75)):
        fq: FairQueue[str] = FairQueue(aging_ms=10_000, weight=lambda t, w=weights: w[t])
        for i in range(2000):
            fq.add(f"a{i}", 5, float(i), "a")
            fq.add(f"b{i}", 5, float(i), "b")
        counts = Counter(s[0] for s in _serve(fq, 1000))
        assert abs(counts["a"] / 1000 - share) <= 0.01, counts


def test_priority_first_and_aging_across_levels() -> None:
    strict: FairQueue[str] = FairQueue(aging_ms=0)
    strict.add("low", 9, 0.0, "a")
    strict.add("high", 0, 50.0, "b")
    strict.add("mid", 5, 10.0, "a")
    assert _serve(strict, 3) == ["high", "mid", "low"]
    aging: FairQueue[str] = FairQueue(aging_ms=100)
    aging.add("old9", 9, 0.0, "a")  # rank 900
    aging.add("new0", 0, 1000.0, "b")  # rank 1000: the old one has aged past it
    assert _serve(aging, 2) == ["old9", "new0"]


def test_skips_and_skipped_tenants_come_back_after_the_pass_without_duplicates() -> None:
    fq: FairQueue[str] = FairQueue(aging_ms=10_000)
    for i in range(50):
        fq.add(f"a{i}", 5, float(i), "a")
        fq.add(f"b{i}", 5, float(i), "b")
    for _ in range(20):  # passes where "a" is at its max_inflight and b0 cannot be granted
        cursor = fq.begin_pass()
        seen = []
        while (e := cursor.next()) is not None:
            seen.append(e.item)
            if e.tenant == "a":
                cursor.skip_tenant("a")
            else:
                cursor.skip(e)
        cursor.end()
        assert len(seen) == 51  # a's head once, then every b
    level = fq._levels[5]
    assert len(level.age) <= 100 and all(len(f.queue) <= 50 for f in level.flows.values())
    assert len(fq) == 100 and fq.tenant_depth() == {"a": 50, "b": 50}
    assert _serve(fq, 2) == ["a0", "b0"]


def test_discards_keep_counts_and_state_bounded() -> None:
    fq: FairQueue[str] = FairQueue(aging_ms=0)
    for round_ in range(50):
        entries = [fq.add(f"{round_}-{i}", i % 10, float(i), f"t{round_}-{i}") for i in range(40)]
        for e in entries:
            fq.discard(e)
            fq.discard(e)  # idempotent
    assert len(fq) == 0 and fq.depth() == [0] * 10 and fq.tenant_depth() == {}
    assert sum(len(level.flows) for level in fq._levels) == 0  # tenants named by requests: gone
    assert fq.drain() == []


def test_many_one_shot_tenants_served_leave_bounded_state() -> None:
    from streams.dispatch.fairqueue import MAX_IDLE_FLOWS

    fq: FairQueue[str] = FairQueue(aging_ms=0)
    for i in range(3 * MAX_IDLE_FLOWS):
        fq.add(str(i), 5, float(i), f"t{i}")
        assert _serve(fq, 1) == [str(i)]
    assert len(fq._levels[5].flows) <= MAX_IDLE_FLOWS + 1
