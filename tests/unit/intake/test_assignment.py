"""Partitions spread evenly over the group's workers, however they joined (``assignor.py``).

faust's assignor keeps each worker's partitions up to ``ceil(partitions / workers)`` when
table standby replicas are on (faust's default: 1), so workers joining one at a time left the
last one idle (4 partitions, 3 workers: 2, 2, 0; CI saw it in the rate-quota test), and its
round robin can leave shares two apart (9 over 4: 3, 3, 2, 1).
"""

from __future__ import annotations

from faust.assignor import partition_assignor as upstream
from faust.assignor.client_assignment import CopartitionedAssignment
from faust.assignor.copartitioned_assignor import CopartitionedAssignor
from hypothesis import given
from hypothesis import strategies as st

from streams.config import load_settings
from streams.intake import assignor
from streams.intake.agent import build_app
from streams.intake.runtime import Runtime


def _replicas() -> int:
    settings = load_settings(environ={})
    app = build_app(settings, Runtime(settings))
    assert isinstance(app.assignor, assignor.PartitionAssignor)
    return int(app.assignor.replicas)


def _assign(before: list[set[int]], partitions: int, replicas: int) -> list[set[int]]:
    clients = {f"w{i}": CopartitionedAssignment(actives=set(a), topics={"req"})
               for i, a in enumerate(before)}
    out = assignor.BalancedAssignor(["req"], clients, partitions, replicas).get_assignment()
    return [out[f"w{i}"].actives for i in range(len(before))]


def test_a_third_worker_joining_two_gets_a_partition() -> None:
    # w0 and w1 hold two partitions each, w2 joins
    held = _assign([{0, 1}, {2, 3}, set()], 4, _replicas())
    assert sorted(len(a) for a in held) == [1, 1, 2]


@given(st.integers(1, 24).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(0, 8), min_size=n, max_size=n), st.integers(1, 8))))
def test_any_sticky_history_ends_balanced(case: tuple[int, list[int], int]) -> None:
    partitions, owner_of, workers = case
    before: list[set[int]] = [set() for _ in range(workers)]
    for p, w in enumerate(owner_of):
        if w < workers:  # else the partition's owner left
            before[w].add(p)
    held = _assign(before, partitions, _replicas())
    assert sorted(p for a in held for p in a) == list(range(partitions))  # each once
    sizes = [len(a) for a in held]
    assert max(sizes) - min(sizes) <= 1, (before, held)


def test_the_assignment_uses_the_balanced_assignor_and_puts_faust_s_back() -> None:
    used = []

    class Probe(assignor.PartitionAssignor):
        def __init__(self) -> None:  # no app: only the swap around faust's assignment
            pass

    def perform(self: object, cluster: object, members: object) -> None:
        used.append(vars(upstream)["CopartitionedAssignor"])

    original = upstream.PartitionAssignor._perform_assignment
    upstream.PartitionAssignor._perform_assignment = perform  # type: ignore[method-assign]
    try:
        Probe()._perform_assignment(None, None)
    finally:
        upstream.PartitionAssignor._perform_assignment = original  # type: ignore[method-assign]
    assert used == [assignor.BalancedAssignor]
    assert vars(upstream)["CopartitionedAssignor"] is CopartitionedAssignor
