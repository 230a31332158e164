from __future__ import annotations

import random

from streams.intake.acks import AckTracker

TP = ("t", 0)


def test_releases_only_the_contiguous_prefix() -> None:
    tr: AckTracker[str] = AckTracker()
    for off in range(5):
        assert tr.add(TP, off, f"e{off}")
    assert tr.finish(TP, 2) == []
    assert tr.finish(TP, 1) == []
    assert tr.finish(TP, 0) == ["e0", "e1", "e2"]
    assert tr.finish(TP, 4) == []
    assert tr.finish(TP, 3) == ["e3", "e4"]
    assert tr.describe() == {str(TP): (0, None, 0)}  # nothing left tracked


def test_random_completion_order_never_acks_past_unfinished_work() -> None:
    rng = random.Random(7)
    tr: AckTracker[int] = AckTracker()
    offsets = list(range(1000))
    for off in offsets:
        tr.add(TP, off, off)
    order = offsets[:]
    rng.shuffle(order)
    finished: set[int] = set()
    acked: list[int] = []
    for off in order:
        finished.add(off)
        acked.extend(tr.finish(TP, off))
        # every acked offset and everything before it has finished
        if acked:
            assert all(o in finished for o in range(acked[-1] + 1))
        assert acked == list(range(len(acked)))
    assert acked == offsets


def test_partitions_are_independent() -> None:
    tr: AckTracker[str] = AckTracker()
    tr.add(("t", 0), 10, "a")
    tr.add(("t", 1), 10, "b")
    assert tr.finish(("t", 1), 10) == ["b"]
    assert tr.describe() == {str(("t", 0)): (1, 10, 0), str(("t", 1)): (0, None, 0)}


def test_redelivery_rebinds_instead_of_starting_again() -> None:
    tr: AckTracker[str] = AckTracker()
    tr.add(TP, 5, "old5")
    tr.add(TP, 6, "old6")
    tr.revoke([TP])
    assert tr.finish(TP, 6) == []  # 5 unfinished still blocks
    assert tr.add(TP, 5, "new5") is False
    assert tr.add(TP, 6, "new6") is False
    assert tr.pending(TP) == []
    assert tr.finish(TP, 5) == ["new5", "new6"]


def test_work_finished_while_revoked_is_not_acked_with_a_stale_token() -> None:
    tr: AckTracker[str] = AckTracker()
    tr.add(TP, 5, "old5")
    tr.revoke([TP])
    assert tr.finish(TP, 5) == []  # no token: faust forgot this generation
    # redelivered later: tracked anew, acked when finished again
    assert tr.add(TP, 5, "new5") is True


def test_first_offset_after_revoke_drops_committed_history() -> None:
    tr: AckTracker[str] = AckTracker()
    for off in (1, 2, 3):
        tr.add(TP, off, str(off))
    tr.finish(TP, 2)
    tr.revoke([TP])
    # faust redelivers from its committed position 3: 1 and 2 were below it
    assert tr.add(TP, 3, "new3") is False
    assert tr.describe()[str(TP)] == (1, 3, 0)  # only offset 3, unfinished
    assert tr.finish(TP, 3) == ["new3"]


def test_out_of_order_add_is_sorted_in() -> None:
    tr: AckTracker[str] = AckTracker()
    tr.add(TP, 10, "10")
    tr.add(TP, 8, "8")
    assert tr.describe()[str(TP)] == (2, 8, 0)  # 8 and 10, lowest first
    assert tr.finish(TP, 10) == []
    assert tr.finish(TP, 8) == ["8", "10"]


def test_len_counts_every_tracked_offset_until_released() -> None:
    tr: AckTracker[int] = AckTracker()
    other = ("t", 1)
    for off in range(5):
        tr.add(TP, off, off)
    tr.add(other, 10, 10)
    assert len(tr) == 6
    tr.finish(TP, 3)
    assert len(tr) == 6  # finished behind offset 0: still tracked
    assert tr.finish(TP, 0) == [0]
    assert len(tr) == 5
    tr.revoke([TP])
    tr.add(TP, 3, 33)  # redelivered from faust's committed position: 1 and 2 are dropped
    assert len(tr) == 3 and tr.describe()[str(TP)] == (2, 3, 1)  # 3 (finished) and 4
    assert tr.pending(TP) == [33] and len(tr) == 2


def test_a_forgotten_offset_is_new_work_when_redelivered_and_holds_nothing_back() -> None:
    """An answer handed over to a partition's new owner is forgotten, not finished: if the
    partition comes back, its redelivery starts the work again (finished, it was acked with no
    output: records lost in the scale 1-3-1 fault scenario)."""
    t: AckTracker[str] = AckTracker()
    for off in (5, 6, 7):
        assert t.add("p", off, f"m{off}")
    assert t.finish("p", 6) == []
    t.revoke(["p"])  # the partition went to another worker, then 5's answer came back
    assert t.forget("p", 5) == []  # 6 released with its stale token: nothing to ack
    assert len(t) == 1 and t.forget("p", 5) == []
    assert t.add("p", 5, "again")  # the partition is back here: new work, not finished
    assert t.finish("p", 5) == ["again"]
