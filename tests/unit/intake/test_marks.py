"""The published marks' batching and parsing (Redis itself: tests/integration/test_published_marks.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.structs import TopicPartition as TP
from hypothesis import given
from hypothesis import strategies as st

from streams.intake.finished import MAX_SPAN, Runs
from streams.intake.marks import PublishedMarks, _parse


class _Pipe:
    def __init__(self, owner: _Redis) -> None:
        self.owner, self.cmds = owner, []  # type: ignore[var-annotated]

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: self.cmds.append((name, args))

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.owner.writes.append(self.cmds)
        await asyncio.sleep(self.owner.latency)
        return [1] * len(self.cmds)


class _Redis:
    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.writes: list[list[tuple[str, tuple[Any, ...]]]] = []

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self)


async def test_offsets_published_together_are_written_together_as_runs() -> None:
    redis = _Redis()
    marks = PublishedMarks(redis, "p", delay=0.01)
    a = TP("req", 2)
    for off in (5, 6, 7, 9):
        marks.add(a, "AAAAAAAAAAA", off, 4)
    await asyncio.sleep(0.05)
    assert redis.writes == [[("zadd", ("p:p:AAAAAAAAAAA:req:2", {"5-8": 8, "9-10": 10})),
                             ("zremrangebyscore", ("p:p:AAAAAAAAAAA:req:2", "-inf", 4)),
                             ("expire", ("p:p:AAAAAAAAAAA:req:2", 7 * 86_400))]]


async def test_what_is_published_during_a_slow_write_goes_in_the_next_one() -> None:
    redis = _Redis(latency=0.05)
    marks = PublishedMarks(redis, "p", delay=0.001)
    a = TP("req", 0)
    marks.add(a, "AAAAAAAAAAA", 1, 0)
    await asyncio.sleep(0.01)  # the first write is under way
    for off in range(2, 50):
        marks.add(a, "AAAAAAAAAAA", off, 0)
    await marks.close()
    assert [w[0][1][1] for w in redis.writes] == [{"1-2": 2}, {"2-50": 50}]


@given(st.lists(st.one_of(st.binary(max_size=30), st.text(max_size=30),
                          st.tuples(st.integers(0, 2**64), st.integers(0, 2**64)).map(
                              lambda t: f"{t[0]}-{t[1]}".encode())), max_size=40),
       st.integers(0, 2**63))
def test_any_members_read_back_give_runs_at_or_above_the_commit(members: list[Any],
                                                                floor: int) -> None:
    runs = _parse(members, floor)
    assert isinstance(runs, Runs)
    for start, end in runs.runs():
        assert floor <= start < end and end - start <= MAX_SPAN
