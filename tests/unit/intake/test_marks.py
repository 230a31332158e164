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
        if self.owner.fail:
            raise ConnectionError("redis is down")
        return [1] * len(self.cmds)


class _Redis:
    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.fail = False
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


async def test_a_key_is_trimmed_when_its_commit_moved_and_its_ttl_set_once_an_hour() -> None:
    redis = _Redis()
    marks = PublishedMarks(redis, "p", delay=0.001)
    a, b = TP("req", 0), TP("req", 1)

    async def write(*adds: tuple[TP, int, int]) -> list[str]:
        for tp, off, floor in adds:
            marks.add(tp, "AAAAAAAAAAA", off, floor)
        await marks.close()
        return [name for name, _ in redis.writes[-1]]

    assert await write((a, 5, 4), (b, 9, 0)) == ["zadd", "zremrangebyscore", "expire"] * 2
    assert await write((a, 6, 4), (b, 10, 0)) == ["zadd", "zadd"]  # nothing moved, TTLs fresh
    assert await write((a, 7, 6), (b, 11, 0)) == ["zadd", "zremrangebyscore", "zadd"]
    assert redis.writes[-1][1] == ("zremrangebyscore", ("p:p:AAAAAAAAAAA:req:0", "-inf", 6))
    redis.fail = True  # a failed write (Redis restarted: keys and TTLs may be gone) ...
    await write((a, 8, 6))
    redis.fail = False  # ... and every key gets its trim and TTL again
    assert await write((a, 9, 6), (b, 12, 0)) == ["zadd", "zremrangebyscore", "expire"] * 2


async def test_a_key_ttl_is_set_again_after_the_refresh() -> None:
    redis = _Redis()
    marks = PublishedMarks(redis, "p", delay=0.001, ttl=2)  # refresh: ttl / 2
    a = TP("req", 0)
    marks.add(a, "AAAAAAAAAAA", 1, 0)
    await marks.close()
    await asyncio.sleep(1.05)
    marks.add(a, "AAAAAAAAAAA", 2, 0)
    await marks.close()
    assert [name for name, _ in redis.writes[-1]] == ["zadd", "expire"]


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
