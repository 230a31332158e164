"""ResponseCache against the real Redis (TEST_REDIS_DB, 13 in this project's runs).

Reads go through the batch path a worker uses (``prefetch``, then ``coalesce`` for a miss).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from streams.cache.codec import ZLIB
from streams.cache.idempotency import IdemRef, Recalled
from streams.cache.keys import tenant_tag
from streams.cache.responses import ResponseCache
from streams.config import Settings, load_settings
from streams.contract import Completion, Request

pytestmark = pytest.mark.integration


class CountingRedis(aioredis.Redis):
    """Counts commands sent outside pipelines (MGET, EVAL...)."""

    calls: Counter[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.calls[str(args[0]).upper()] += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[CountingRedis]]:
    made: list[CountingRedis] = []
    for _ in range(2):
        c = CountingRedis.from_url(redis_url)
        assert isinstance(c, CountingRedis)
        c.calls = Counter()
        made.append(c)
    try:
        yield made
    finally:
        for c in made:
            await c.aclose()


@pytest.fixture
def prefix() -> str:
    # A prefix of its own: nothing else in the database can collide with this test.
    return f"it-cache-{uuid.uuid4().hex[:8]}"


async def looked(c: ResponseCache, r: Request) -> Completion | None:
    """The cached answer the batch path finds for ``r`` (its prefetch)."""
    (got,) = await c.prefetch([r], ["llm.requests"])
    return got.hit


async def recalled(c: ResponseCache, rid: str, **kw: Any) -> Recalled | None:
    """The output record the batch path finds for request ``rid`` (as ``ref`` builds it)."""
    (got,) = await c.prefetch([req(id=rid, **kw)], ["llm.requests"])
    return got.recalled


async def answered(c: ResponseCache, r: Request, compute: Any) -> Completion:
    """The batch path of one request: its hit, else one coalesced compute (which stores)."""
    (got,) = await c.prefetch([r], ["llm.requests"])
    return got.hit if got.hit is not None else await c.coalesce(r, got.key, compute)


def settings(prefix: str, **cache: Any) -> Settings:
    return load_settings(environ={}, redis={"key_prefix": prefix}, cache=cache)


def make(client: aioredis.Redis, prefix: str, **cache: Any) -> ResponseCache:
    return ResponseCache(settings(prefix, **cache), client, CollectorRegistry())


def req(prompt: str = "hi", **kw: Any) -> Request:
    doc: dict[str, Any] = {"id": "r1", "model": "m", "input": prompt}
    doc.update(kw)
    return Request.model_validate(doc)


def comp(text: str = "answer") -> Completion:
    body = {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {}}
    return Completion(model="m", body=body, endpoint="mock-a", attempts=1)


async def test_hit_miss_and_ttl(redis_client: aioredis.Redis, prefix: str) -> None:
    cache = make(redis_client, prefix, ttl_seconds=600)
    assert await looked(cache, req()) is None
    await cache.store(req(), comp())
    await cache.store(req("short", cache={"ttl": 5}), comp())
    hit = await looked(cache, req("  hi "))  # whitespace-normalized: same key
    assert hit is not None and hit.cached and hit.output == "answer"
    assert 590 < await redis_client.ttl(cache.redis_store.ckey(cache.key(req()))) <= 600
    assert 0 < await redis_client.ttl(cache.redis_store.ckey(cache.key(req("short")))) <= 5
    other_tenant = req(tenant="someone-else")
    assert await looked(cache, other_tenant) is None


async def test_no_cache_and_no_store(redis_client: aioredis.Redis, prefix: str) -> None:
    cache = make(redis_client, prefix)
    await cache.store(req(), comp())
    assert await looked(cache, req(cache={"no_cache": True})) is None
    await cache.store(req("x", cache={"no_store": True}), comp())
    assert await looked(cache, req("x")) is None


async def test_compression_round_trip(redis_client: aioredis.Redis, prefix: str) -> None:
    cache = make(redis_client, prefix, compress_min_bytes=256)
    text = "the same sentence again. " * 400
    await cache.store(req("long"), comp(text))
    raw = await redis_client.get(cache.redis_store.ckey(cache.key(req("long"))))
    assert raw is not None and raw[:1] == ZLIB and len(raw) < len(text) // 5
    hit = await looked(cache, req("long"))
    assert hit is not None and hit.output == text


def ref(cache: ResponseCache, rid: str, **kw: Any) -> IdemRef:
    return cache.ref(req(id=rid, **kw), "llm.requests")


async def test_idempotency_round_trip(redis_client: aioredis.Redis, prefix: str) -> None:
    cache = make(redis_client, prefix)
    dlq = b'{"id":"req-42","error":{}}'
    r42, r44 = ref(cache, "req-42"), ref(cache, "req-44")
    await cache.remember(r42, dlq, kind="dead_letter", ttl=30)
    await cache.remember(r44, b'{"id":"req-44"}')
    assert await recalled(cache, "req-42") == Recalled("dead_letter", dlq)
    assert await recalled(cache, "req-44") == Recalled("response", b'{"id":"req-44"}')
    assert await recalled(cache, "req-43") is None
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:r:*")]
    assert len(keys) == 2 and not any(b"req-4" in k for k in keys)


async def test_ids_are_scoped_by_tenant_and_checked_against_content(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    cache = make(redis_client, prefix)
    a = ref(cache, "job-1", tenant="a", metadata={"owner": "a"})
    await cache.remember(a, b'{"metadata":{"owner":"a"}}')
    assert await recalled(cache, "job-1", tenant="a", metadata={"owner": "a"}) == Recalled(
        "response", b'{"metadata":{"owner":"a"}}')
    assert await recalled(cache, "job-1", tenant="b", metadata={"owner": "a"}) is None
    assert await recalled(cache, "job-1", tenant="a", metadata={"owner": "x"}) is None
    assert cache.metrics.conflicts._value.get() == 1  # only tenant a's own id reuse
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:r:{tenant_tag('a')}:*")]
    assert keys == [a.key.encode()]


async def test_a_set_out_of_redis_range_fails_alone_and_keeps_the_cache_in_use(
    redis_client: aioredis.Redis, prefix: str
) -> None:
    cache = make(redis_client, prefix, redis_retry_seconds=60)
    huge = req("huge", cache={"ttl": 10**16})  # Redis refuses this EX
    await asyncio.gather(cache.store(huge, comp()), cache.store(req("fine"), comp()))
    assert cache.metrics.errors.labels("write")._value.get() == 1
    assert await looked(cache, huge) is None
    assert await looked(cache, req("fine")) is not None  # the circuit did not open
    hit = await answered(cache, req("next"), _answer("fresh"))
    assert not hit.cached and await looked(cache, req("next")) is not None


def _answer(text: str) -> Any:
    async def compute() -> Completion:
        return comp(text)

    return compute


async def test_lookups_are_batched_into_few_mgets(
    clients: list[CountingRedis], prefix: str
) -> None:
    client = clients[0]
    cache = make(client, prefix, batch_max_keys=256)
    await asyncio.gather(*(cache.store(req(f"p{i}"), comp()) for i in range(0, 300, 3)))
    client.calls.clear()
    got = await asyncio.gather(*(looked(cache, req(f"p{i}")) for i in range(300)))
    assert sum(g is not None for g in got) == 100
    # 300 idempotency keys and 300 cache keys, 256 per MGET
    assert client.calls["MGET"] == 3 and client.calls["GET"] == 0


async def test_500_identical_requests_on_two_workers_call_upstream_once(
    clients: list[CountingRedis], prefix: str
) -> None:
    a, b = (make(c, prefix) for c in clients)
    calls = 0

    async def compute() -> Completion:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return comp("shared")

    r = req("popular question")
    started = time.monotonic()
    out = await asyncio.gather(*(answered(w, r, compute) for w in (a, b) * 250))
    assert calls == 1
    assert len(out) == 500 and all(c.output == "shared" for c in out)
    assert sum(not c.cached for c in out) == 1
    assert time.monotonic() - started < 1.5
    assert await clients[0].exists(a.redis_store.lkey(a.key(r))) == 0  # lock released


async def test_leader_failure_one_waiter_computes_for_all(
    clients: list[CountingRedis], prefix: str
) -> None:
    a, b = (make(c, prefix) for c in clients)
    calls = 0

    async def compute() -> Completion:
        nonlocal calls
        calls += 1
        first = calls == 1
        await asyncio.sleep(0.1)
        if first:
            raise RuntimeError("upstream exploded")
        return comp("retry worked")

    r = req("fragile")
    key = a.key(r)
    first = asyncio.ensure_future(a.coalesce(r, key, compute))
    await asyncio.sleep(0.02)  # a's leader holds the lock before anyone else arrives
    rest = [asyncio.ensure_future(w.coalesce(r, key, compute)) for w in (a, b) * 10]
    with pytest.raises(RuntimeError):
        await first
    out = await asyncio.gather(*rest)
    assert all(c.output == "retry worked" for c in out)
    # the failed leader's waiters and b's contend for the freed lock: one of them computes
    # (the retry), every other shares its answer, on both workers
    assert calls == 2


async def test_dead_lock_holder_is_taken_over(redis_client: aioredis.Redis, prefix: str) -> None:
    cache = make(redis_client, prefix, coalesce_lock_seconds=0.3)
    r = req()
    await redis_client.set(cache.redis_store.lkey(cache.key(r)), b"crashed-worker", px=300)

    async def compute() -> Completion:
        return comp()

    started = time.monotonic()
    got = await cache.coalesce(r, cache.key(r), compute)
    assert not got.cached and 0.2 < time.monotonic() - started < 1.0


async def test_unreachable_redis_is_fast_and_silent(prefix: str) -> None:
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/13", socket_connect_timeout=0.5)
    try:
        cache = make(dead, prefix, redis_attempts=3, redis_backoff_seconds=0.05)
        started = time.monotonic()
        assert await looked(cache, req()) is None
        await cache.store(req(), comp())
        await cache.remember(ref(cache, "id"), b"{}")
        assert await recalled(cache, "id") is None

        async def compute() -> Completion:
            await asyncio.sleep(0.01)
            return comp()

        out = await asyncio.gather(*(answered(cache, req(), compute) for _ in range(50)))
        assert len(out) == 50
        # five calls that decide payment (three prefetches, a remember, the write of the
        # answer computed without a lock), each refused at once three times with 0.05 + 0.1 s
        # between the tries
        assert time.monotonic() - started < 5 * 0.15 + 0.5
        errors = cache.metrics.errors.labels
        # the circuit kept the cache's store and the lock attempt away from the dead server;
        # only what decides payment was tried
        assert errors("read")._value.get() == 3 * 3
        assert errors("write")._value.get() == 2 * 3 and errors("lock")._value.get() == 0
        assert cache.metrics.unchecked._value.get() == 1 + 1 + 50
    finally:
        await dead.aclose()


@pytest.mark.parametrize("scripted", [True, False], ids=["script", "pipeline"])
async def test_lock_batches_as_a_script_and_as_single_commands_agree(
    redis_client: aioredis.Redis, prefix: str, scripted: bool
) -> None:
    # The batch script of one Redis server and the cluster's pipeline of single commands
    # (``cache/locks.py``): the same states, answers and releases, on the real server.
    from streams.cache.locks import LockState

    cache = make(redis_client, prefix)
    locks = cache._locks
    locks._scripted = scripted
    store = cache.redis_store
    got = await asyncio.gather(locks.try_lock("a", "t1", 10_000), locks.try_lock("b", "t1", 10_000))
    assert [g[0] for g in got] == [LockState.ACQUIRED, LockState.ACQUIRED]
    await redis_client.pexpire(store.lkey("a"), 500)
    got = await asyncio.gather(
        locks.try_lock("a", "t1", 10_000),  # our own earlier attempt: ours, renewed
        locks.try_lock("b", "t2", 10_000),  # another holder's
    )
    assert [g[0] for g in got] == [LockState.ACQUIRED, LockState.HELD]
    assert await redis_client.pttl(store.lkey("a")) > 5_000
    assert await asyncio.gather(locks.extend("a", "t1", 20_000), locks.extend("b", "t2", 20_000)
                                ) == [True, False]
    await asyncio.gather(locks.finish("a", "t1", comp("A"), 60), locks.finish("b", "t9", None, None))
    assert await redis_client.get(store.lkey("a")) is None  # released by its holder
    assert await redis_client.get(store.lkey("b")) == b"t1"  # not by another token
    state, body = await locks.try_lock("a", "t3", 10_000)
    assert state is LockState.ACQUIRED and body is not None  # the answer stored before release
    assert body["choices"][0]["message"]["content"] == "A"
    assert 0 < await redis_client.ttl(store.ckey("a")) <= 60
