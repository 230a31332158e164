"""The marks of published offsets (``intake/marks.py``) on a real Redis and a real Redis Cluster:
written in batches, read back above the committed offset under the partition's token only,
trimmed below it, and a Redis that does not answer costs redone records, never an error."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka.structs import TopicPartition as TP

from streams.config import load_settings
from streams.intake.acks import AckTracker
from streams.intake.finished import Runs, encode, token_of
from streams.intake.ledger import Ledger
from streams.intake.marks import PublishedMarks
from streams.redis_io import open_redis
from tests.integration.redis_cluster import LocalCluster

pytestmark = pytest.mark.integration


async def _settled(marks: PublishedMarks) -> None:
    await asyncio.sleep(0.05)
    await marks.close()


async def test_marks_are_read_back_under_their_token_above_the_commit(
    redis_client: aioredis.Redis,
) -> None:
    marks = PublishedMarks(redis_client, "it", delay=0.01)
    a, b = TP("req", 0), TP("req", 1)
    for off in (12, 13, 14, 20, 11):
        marks.add(a, "AAAAAAAAAAA", off, 10)
    marks.add(b, "BBBBBBBBBBB", 5, 0)
    await _settled(marks)
    got = await marks.read({a: ("AAAAAAAAAAA", 10), b: ("BBBBBBBBBBB", 0)})
    assert got == {a: Runs([(11, 15), (20, 21)]), b: Runs([(5, 6)])}
    # another history of the same partition (an offset reset drew a new token): nothing
    assert await marks.read({a: ("CCCCCCCCCCC", 10)}) == {}
    # a later commit: only what is at or above it
    assert await marks.read({a: ("AAAAAAAAAAA", 14)}) == {a: Runs([(14, 15), (20, 21)])}
    # each write drops the runs the committed offset passed, and keeps the key a while
    marks.add(a, "AAAAAAAAAAA", 30, 16)
    await _settled(marks)
    key = marks.key(a, "AAAAAAAAAAA")
    assert sorted(await redis_client.zrange(key, 0, -1)) == [b"20-21", b"30-31"]
    assert 0 < await redis_client.ttl(key) <= 7 * 86_400


async def test_malformed_marks_are_ignored(redis_client: aioredis.Redis) -> None:
    marks = PublishedMarks(redis_client, "it")
    a = TP("req", 0)
    key = marks.key(a, "AAAAAAAAAAA")
    await redis_client.zadd(key, {"7-9": 9, "junk": 50, "9-3": 60, "-1-4": 4, "40-41": 41,
                                  f"0-{1 << 40}": 1 << 40})
    assert await marks.read({a: ("AAAAAAAAAAA", 0)}) == {a: Runs([(7, 9), (40, 41)])}


async def test_a_ledger_reads_the_marks_written_after_the_last_commit(
    redis_client: aioredis.Redis,
) -> None:
    """The crash this is for: offsets published after the last commit. The next owner reads
    the commit (its token) and the marks, and skips both."""
    old = Ledger(AckTracker(), marks=PublishedMarks(redis_client, "it", delay=0.01))
    tp = TP("req", 3)
    await old.read_all({tp: (None, "")})  # a new group: no commit yet
    metadata = old.written(tp, 0)  # the first commit, named nothing yet: its token
    for off in (1, 2, 5):
        old.published(tp, off)  # published after that commit, then SIGKILL
    assert old.marks is not None
    await _settled(old.marks)
    new = Ledger(AckTracker(), marks=PublishedMarks(redis_client, "it"))
    await new.read_all({tp: (0, metadata)})
    assert [off for off in range(8) if new.skips(tp, off)] == [1, 2, 5]
    assert token_of(new.written(tp, 0)) == token_of(metadata)  # the same history goes on
    # a commit without our token (an offset reset) is another history: the marks are not read
    reset = Ledger(AckTracker(), marks=PublishedMarks(redis_client, "it"))
    await reset.read_all({tp: (0, "")})
    assert not any(reset.skips(tp, off) for off in range(8))
    # nor when the metadata is an older worker's (no token) naming other offsets
    older = Ledger(AckTracker(), marks=PublishedMarks(redis_client, "it"))
    await older.read_all({tp: (0, encode(0, Runs([(3, 4)])))})
    assert [off for off in range(8) if older.skips(tp, off)] == [3]


async def test_a_redis_that_does_not_answer_leaves_records_redone(
    unreachable_redis: aioredis.Redis,
) -> None:
    marks = PublishedMarks(unreachable_redis, "it", delay=0.01, read_seconds=1.0)
    tp = TP("req", 0)
    marks.add(tp, "AAAAAAAAAAA", 4, 0)
    await _settled(marks)  # the write fails: logged, nothing raised
    assert await marks.read({tp: ("AAAAAAAAAAA", 0)}) == {}


async def test_marks_on_a_redis_cluster_spread_over_the_shards(redis_cluster: LocalCluster) -> None:
    prefix = f"it-m-{uuid.uuid4().hex[:8]}"
    settings = load_settings(environ={}, redis={"url": redis_cluster.url, "cluster": True,
                                                "key_prefix": prefix})
    client: Any = open_redis(settings)
    try:
        marks = PublishedMarks(client, prefix, delay=0.01)
        tps = [TP("req", p) for p in range(12)]
        for p, tp in enumerate(tps):
            marks.add(tp, "AAAAAAAAAAA", 100 + p, 100)
        await _settled(marks)
        got = await marks.read({tp: ("AAAAAAAAAAA", 100) for tp in tps})
        assert got == {tp: Runs([(100 + p, 101 + p)]) for p, tp in enumerate(tps)}
        from redis.crc import key_slot
        slots = {key_slot(marks.key(tp, "AAAAAAAAAAA").encode()) for tp in tps}
        assert len(slots) > 1
    finally:
        await client.aclose()
