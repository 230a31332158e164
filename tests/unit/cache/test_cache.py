"""ResponseCache against an in-memory fake Redis: batching, codec, outage, coalescing.

Reads go through the batch path a worker uses (``prefetch``, then ``coalesce`` for a miss).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from streams.cache.codec import RAW, ZLIB, decode_body, decode_value, encode_value
from streams.cache.idempotency import IdemRef, Recalled
from streams.cache.locks import LockState, RedisLocks
from streams.cache.responses import MAX_MODEL_LABELS, ResponseCache
from streams.config import Settings, load_settings
from streams.contract import Completion, Request
from streams.dispatch.claim import check_claim
from streams.errors import ClaimLost
from tests.fakes.clock import Clock
from tests.fakes.fake_redis import FakeRedis


def settings(**cache: Any) -> Settings:
    # short backoff between the tries of a failed read: the tries are counted, not timed
    return load_settings(environ={}, cache={"redis_backoff_seconds": 0.001, **cache})


def make(
    fake: FakeRedis | None = None, clock: Any = None, **cache: Any
) -> tuple[ResponseCache, FakeRedis, CollectorRegistry]:
    fake = fake or FakeRedis()
    reg = CollectorRegistry()
    kw = {"clock": clock} if clock is not None else {}
    return ResponseCache(settings(**cache), fake, reg, **kw), fake, reg  # type: ignore[arg-type]


def req(prompt: str = "hi", **kw: Any) -> Request:
    doc: dict[str, Any] = {"id": "r1", "model": "m", "input": prompt}
    doc.update(kw)
    return Request.model_validate(doc)


def comp(text: str = "answer", **kw: Any) -> Completion:
    body = {"id": "x", "choices": [{"message": {"role": "assistant", "content": text}}]}
    return Completion(model="m", body=body, endpoint="mock-a", attempts=1, **kw)


def ref(c: ResponseCache, rid: str = "r1", topic: str = "llm.requests", **kw: Any) -> IdemRef:
    return c.ref(req(id=rid, **kw), topic)



async def looked(c: ResponseCache, r: Request, topic: str = "llm.requests") -> Completion | None:
    """The cached answer the batch path finds for ``r`` (its prefetch)."""
    (got,) = await c.prefetch([r], [topic])
    return got.hit


async def recalled(c: ResponseCache, rid: str = "r1", topic: str = "llm.requests",
                   **kw: Any) -> Recalled | None:
    """The output record the batch path finds for request ``rid`` (as ``ref`` builds it)."""
    (got,) = await c.prefetch([req(id=rid, **kw)], [topic])
    return got.recalled


async def answered(c: ResponseCache, r: Request, compute: Any) -> Completion:
    """The batch path of one request: its hit, else one coalesced compute (which stores)."""
    (got,) = await c.prefetch([r], ["llm.requests"])
    return got.hit if got.hit is not None else await c.coalesce(r, got.key, compute)


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(f"llm_streams_cache_{name}_total", labels) or 0.0


# -- codec ---------------------------------------------------------------------------


def test_codec_round_trips_raw_and_zlib() -> None:
    small, big = b'{"a":1}', b'{"t":"' + b"x" * 5000 + b'"}'
    assert encode_value(small, 2048)[:1] == RAW
    packed = encode_value(big, 2048)
    assert packed[:1] == ZLIB and len(packed) < len(big)
    assert bytes(decode_value(packed) or b"") == big
    assert bytes(decode_value(encode_value(small, 2048)) or b"") == small


def test_codec_keeps_incompressible_data_raw_and_rejects_garbage() -> None:
    noise = os.urandom(4096)
    assert encode_value(noise, 10)[:1] == RAW
    assert decode_value(b"\x07junk") is None
    assert decode_value(ZLIB + b"not zlib") is None
    assert decode_body(RAW + b"[1,2]") is None  # not an object
    assert decode_body(RAW + b"{bad") is None


# -- response cache ------------------------------------------------------------------


async def test_miss_store_hit() -> None:
    cache, fake, reg = make()
    r = req()
    assert await looked(cache, r) is None
    await cache.store(r, comp())
    hit = await looked(cache, r)
    assert hit is not None
    assert (hit.cached, hit.endpoint, hit.attempts, hit.model) == (True, None, 0, "m")
    assert hit.output == "answer"
    assert metric(reg, "hits", model="m") == 1 and metric(reg, "misses", model="m") == 1
    assert metric(reg, "writes", store="cache") == 1
    assert all(k.startswith(b"llmstreams:c:_:") for k in fake.data)


async def test_concurrent_lookups_share_one_mget() -> None:
    cache, fake, _ = make()
    await cache.store(req("p3"), comp())
    # 100 prefetches of one tick: 100 idempotency keys and 100 cache keys, one MGET
    results = await asyncio.gather(*(looked(cache, req(f"p{i % 10}")) for i in range(100)))
    assert fake.round_trips["mget"] == 1
    assert sum(r is not None for r in results) == 10


async def test_batches_are_capped_at_batch_max_keys() -> None:
    cache, fake, _ = make(batch_max_keys=256)
    await asyncio.gather(*(looked(cache, req(f"p{i}")) for i in range(300)))  # 600 keys
    assert fake.round_trips["mget"] == 3


async def test_lookups_and_recalls_of_one_tick_share_a_round_trip() -> None:
    cache, fake, _ = make()
    await cache.remember(ref(cache, "id-1"), b'{"id":"id-1"}')
    got = await asyncio.gather(looked(cache, req()), recalled(cache, "id-1"), recalled(cache, "nope"))
    assert got[1] == Recalled("response", b'{"id":"id-1"}') and got[2] is None
    assert fake.round_trips["mget"] == 1


async def test_writes_are_batched() -> None:
    # One script for the batch on a single Redis; a cluster's store sends a pipeline
    for scripted in (True, False):
        cache, fake, _ = make()
        cache.redis_store._cluster = not scripted
        await asyncio.gather(*(cache.store(req(f"p{i}"), comp()) for i in range(50)))
        trips = fake.round_trips["eval" if scripted else "pipeline"]
        assert trips == 1 and sum(fake.round_trips.values()) == 1 and len(fake.data) == 50


async def test_ttl_default_and_per_request() -> None:
    cache, fake, _ = make(ttl_seconds=500)
    await cache.store(req("a"), comp())
    await cache.store(req("b", cache={"ttl": 7}), comp())
    ttl_a = fake.ttl(cache.redis_store.ckey(cache.key(req("a"))))
    ttl_b = fake.ttl(cache.redis_store.ckey(cache.key(req("b"))))
    assert ttl_a is not None and 499 < ttl_a <= 500
    assert ttl_b is not None and 6 < ttl_b <= 7


async def test_no_cache_no_store_disabled_and_cached_answers() -> None:
    cache, fake, _ = make()
    await cache.store(req(), comp())
    assert await looked(cache, req(cache={"no_cache": True})) is None
    await cache.store(req("other", cache={"no_store": True}), comp())
    await cache.store(req("again"), comp(cached=True))  # a hit is never written back
    assert len(fake.data) == 1
    off, fake2, reg_off = make(enabled=False)
    await off.store(req(), comp())
    assert await looked(off, req()) is None and not fake2.data
    assert fake2.round_trips == {"mget": 1}  # the idempotency store only: no lookup counted
    assert metric(reg_off, "misses", model="m") == 0 and metric(reg_off, "hits", model="m") == 0


async def test_large_values_compressed_and_too_large_skipped() -> None:
    cache, fake, reg = make(compress_min_bytes=100, max_value_bytes=2000)
    await cache.store(req("big"), comp("word " * 1000))  # 5 kB, compresses well
    (value,) = fake.data.values()
    assert value[0][:1] == ZLIB
    hit = await looked(cache, req("big"))
    assert hit is not None and hit.output == "word " * 1000
    await cache.store(req("huge"), comp(os.urandom(3000).hex()))
    assert len(fake.data) == 1 and metric(reg, "skipped_writes", reason="too_large") == 1


async def test_remember_recall_kinds_and_replay_metric() -> None:
    cache, fake, reg = make(compress_min_bytes=10)
    record = b'{"id":"a","status":"ok","output":"' + b"y" * 200 + b'"}'
    a, b = ref(cache, "a"), ref(cache, "secret-id-b")
    await cache.remember(a, record)
    await cache.remember(b, b'{"id":"b"}', kind="dead_letter", ttl=5)
    assert [await recalled(cache, x) for x in ("a", "secret-id-b", "c")] == [
        Recalled("response", record),
        Recalled("dead_letter", b'{"id":"b"}'),  # the processor replays responses only
        None,
    ]
    assert all(k.startswith(b"llmstreams:r:_:") for k in fake.data)
    assert not any(b"secret" in k for k in fake.data)
    ttl = fake.ttl(b.key)
    assert ttl is not None and 4 < ttl <= 5
    cache.note_replay("response")
    assert metric(reg, "idempotent_replays", kind="response") == 1


async def test_model_labels_are_bounded() -> None:
    cache, _, reg = make()
    for i in range(MAX_MODEL_LABELS + 10):
        await looked(cache, req(model=f"m{i}"))
    assert metric(reg, "misses", model="other") == 10


def test_rejects_decoding_client() -> None:
    client = aioredis.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        ResponseCache(settings(), client, CollectorRegistry())


# -- outage --------------------------------------------------------------------------


async def test_redis_errors_never_raise_and_short_circuit(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(1000.0)
    cache, fake, reg = make(clock=clock, redis_retry_seconds=1.0, error_log_interval_seconds=10)
    fake.fail = True
    caplog.set_level(logging.WARNING, logger="streams.cache")
    assert await looked(cache, req()) is None  # a prefetch decides payment: tried 3 times
    await cache.store(req(), comp())
    assert fake.round_trips["mget"] == 3 and fake.batches() == 0  # circuit open
    assert metric(reg, "errors", op="read") == 3
    assert metric(reg, "skipped_writes", reason="redis_unavailable") == 1
    clock.now += 1.5
    await cache.store(req(), comp())  # the retry is due: tried once, fails
    assert fake.batches() == 1 and metric(reg, "errors", op="write") == 1
    clock.now += 0.5
    await cache.store(req(), comp())  # the next one is not due yet (the delay doubled)
    assert fake.batches() == 1
    assert len([r for r in caplog.records if "redis error" in r.getMessage()]) == 1
    fake.fail = False
    clock.now += 1.5
    await cache.store(req(), comp())
    assert await looked(cache, req()) is not None  # back in use at once


async def test_the_idempotency_store_is_tried_while_the_circuit_is_open() -> None:
    # one slow command under load opens the circuit; skipping the idempotency store then
    # would let a redelivered, already answered id call the upstream again
    cache, fake, reg = make(clock=Clock(1000.0), redis_retry_seconds=60.0)
    fake.fail = True
    await cache.store(req(), comp())  # the circuit opens for 60 s
    assert fake.batches() == 1
    x = ref(cache, "x")
    await cache.remember(x, b'{"id":"x"}')  # tried 3 times, failed: counted as skipped
    assert await recalled(cache, "x") is None  # tried 3 times
    assert fake.batches() == 4 and fake.round_trips["mget"] == 3
    assert metric(reg, "skipped_writes", reason="redis_unavailable") == 2
    fake.fail = False  # Redis answers again; the circuit is still open
    await cache.store(req(), comp())
    assert fake.batches() == 4 and not fake.data  # a cache write waits
    await cache.remember(x, b'{"id":"x"}')
    assert await recalled(cache, "x") == Recalled("response", b'{"id":"x"}')
    assert fake.round_trips["mget"] == 4
    assert metric(reg, "writes", store="idempotency") == 1


# -- coalescing ----------------------------------------------------------------------


def counting(answer: Completion, *, delay: float = 0.02, fail: bool = False) -> Any:
    calls = {"n": 0}

    async def compute() -> Completion:
        calls["n"] += 1
        await asyncio.sleep(delay)
        if fail and calls["n"] == 1:
            raise RuntimeError("leader failed")
        return answer

    return compute, calls


async def test_in_process_coalescing_calls_once_and_stores() -> None:
    cache, fake, reg = make()
    compute, calls = counting(comp())
    r = req()
    out = await asyncio.gather(*(answered(cache, r, compute) for _ in range(100)))
    assert calls["n"] == 1
    assert sum(not c.cached for c in out) == 1 and sum(c.cached for c in out) == 99
    assert metric(reg, "coalesced", scope="local") == 99
    assert await looked(cache, r) is not None
    # nothing of it is left in the process: once its answer is gone from Redis, a caller computes
    fake.data.clear()
    again = await cache.coalesce(r, cache.key(r), compute)
    assert calls["n"] == 2 and not again.cached
    assert not any(k.startswith(b"llmstreams:l:") for k in fake.data)  # lock released


async def test_leader_failure_lets_one_waiter_compute_for_the_others() -> None:
    # the waiters contend for the lock again: one computes (its own retries), the rest wait
    # for its answer rather than each calling the upstream without the lock
    cache, _, reg = make()
    compute, calls = counting(comp(), fail=True)
    r = req()
    out = await asyncio.gather(
        *(cache.coalesce(r, cache.key(r), compute) for _ in range(5)), return_exceptions=True
    )
    assert sum(isinstance(o, RuntimeError) for o in out) == 1
    assert sum(isinstance(o, Completion) for o in out) == 4
    assert calls["n"] == 2
    assert sum(isinstance(o, Completion) and o.cached for o in out) == 3
    assert metric(reg, "coalesce_fallbacks", reason="leader_failed") == 4


async def test_no_cache_does_not_coalesce_and_no_store_stays_local() -> None:
    cache, fake, _ = make()
    compute, calls = counting(comp())
    r = req(cache={"no_cache": True})
    await asyncio.gather(*(cache.coalesce(r, cache.key(r), compute) for _ in range(3)))
    assert calls["n"] == 3 and len(fake.data) == 1  # no_cache still stores its answer
    fake.data.clear()
    fake.round_trips.clear()
    compute, calls = counting(comp())
    r = req(cache={"no_store": True})
    await asyncio.gather(*(cache.coalesce(r, cache.key(r), compute) for _ in range(3)))
    assert calls["n"] == 1 and not fake.data and fake.round_trips["pipeline"] == 0


async def test_two_processes_share_one_compute() -> None:
    shared = FakeRedis()
    a, _, reg_a = make(shared)
    b, _, reg_b = make(shared)
    compute, calls = counting(comp(), delay=0.05)
    r = req()
    out = await asyncio.gather(*(answered(c, r, compute) for c in (a, b) * 20))
    assert calls["n"] == 1 and sum(not c.cached for c in out) == 1
    remote = [metric(reg, "coalesced", scope="remote") for reg in (reg_a, reg_b)]
    assert sum(remote) == 1


async def test_dead_lock_holder_expires_and_waiter_takes_over() -> None:
    cache, fake, reg = make(coalesce_lock_seconds=0.1)
    r = req()
    key = cache.key(r)
    fake._set(cache.redis_store.lkey(key), b"someone-dead", px=100)
    compute, calls = counting(comp(), delay=0)
    got = await asyncio.wait_for(cache.coalesce(r, key, compute), 1.0)
    assert calls["n"] == 1 and not got.cached


async def test_waiter_gives_up_after_coalesce_wait_seconds() -> None:
    cache, fake, reg = make(coalesce_wait_seconds=0.1, coalesce_lock_seconds=30)
    r = req()
    key = cache.key(r)
    fake._set(cache.redis_store.lkey(key), b"alive-but-slow", px=30_000)
    compute, calls = counting(comp(), delay=0)
    await asyncio.wait_for(cache.coalesce(r, key, compute), 1.0)
    assert calls["n"] == 1 and metric(reg, "coalesce_fallbacks", reason="timeout") == 1


async def test_heartbeat_keeps_a_slow_leaders_lock() -> None:
    cache, fake, _ = make(coalesce_lock_seconds=1.0)  # renewed every 333 ms
    r = req()
    key = cache.key(r)
    seen: list[bool] = []

    async def slow() -> Completion:
        for _ in range(4):
            await asyncio.sleep(0.6)
            seen.append(fake._get(cache.redis_store.lkey(key)) is not None)
        return comp()

    await cache.coalesce(r, key, slow)
    assert all(seen) and fake._get(cache.redis_store.lkey(key)) is None


async def test_one_heartbeat_renews_every_held_lock() -> None:
    # Read-ahead keeps thousands of leaders holding their lock while they wait for an in-flight
    # slot: each had its own heartbeat task, timer and context. One task renews them all now.
    cache, fake, _ = make(coalesce_lock_seconds=0.3)  # renewed every 100 ms
    reqs = [req(f"p{i}") for i in range(50)]
    release = asyncio.Event()
    tasks_while_held: list[int] = []

    async def slow() -> Completion:
        await release.wait()
        return comp()

    before = len(asyncio.all_tasks())
    calls = [asyncio.ensure_future(cache.coalesce(r, cache.key(r), slow)) for r in reqs]
    await asyncio.sleep(0.7)  # more than two lock lives
    tasks_while_held.append(len(asyncio.all_tasks()) - before)
    held = [fake._get(cache.redis_store.lkey(cache.key(r))) is not None for r in reqs]
    release.set()
    await asyncio.gather(*calls)
    assert all(held)
    assert tasks_while_held == [50 + 1]  # the callers and one heartbeat
    assert all(fake._get(cache.redis_store.lkey(cache.key(r))) is None for r in reqs)
    await asyncio.sleep(0.15)  # nothing held: the heartbeat ends
    assert cache.coalescer._beater is None


async def test_a_leaders_lock_is_renewed_while_the_circuit_is_open() -> None:
    # Under load one slow command opens the circuit; renewals skipped for a lock's life let the
    # lock expire while its holder still computes, and another worker then paid the same call
    # (scale 1-3-1: ~1,000 locks lost in one worker). A renewal is tried through the circuit.
    cache, fake, _ = make(coalesce_lock_seconds=0.3, redis_retry_seconds=60.0)  # every 100 ms
    r = req()
    lkey = cache.redis_store.lkey(cache.key(r))
    held: list[bool] = []

    async def slow() -> Completion:
        fake.fail = True
        await cache.store(req("other"), comp())  # an outage error: the circuit opens for 60 s
        fake.fail = False  # Redis answers again; the circuit stays open
        for _ in range(3):
            await asyncio.sleep(0.25)
            held.append(fake._get(lkey) is not None)
        return comp()

    await cache.coalesce(r, cache.key(r), slow)
    assert held == [True] * 3  # 0.75 s: the 300 ms lock was renewed all along


async def test_a_lock_set_by_our_own_unanswered_attempt_is_ours_with_a_fresh_expiry() -> None:
    # The attempt timed out client-side but Redis had set the lock: waiting on it as if another
    # worker held it cost a lock's life; taking it back must renew it (it may expire at once).
    cache, fake, _ = make()
    locks = RedisLocks(cache.redis_store, 256)
    lkey = cache.redis_store.lkey("k")
    fake._set(lkey, b"ours", px=50)
    assert (await locks.try_lock("k", "ours", 10_000))[0] is LockState.ACQUIRED
    assert (fake.ttl(lkey) or 0) > 5
    assert (await locks.try_lock("k", "theirs", 10_000))[0] is LockState.HELD
    assert await locks.peek("k", "ours") == (None, False)  # not held by another
    assert await locks.peek("k", "theirs") == (None, True)


async def test_a_lock_lost_with_nobody_else_is_taken_again_and_called_once() -> None:
    # A Redis restart loses every lock: a holder's last look before its call (the dispatcher's
    # check_claim) finds its lock gone, makes no call and takes the lock again. The release of
    # the lost lock, sent in the background, must not release the new one (it did, with the
    # same token: the request then looped without ever calling).
    cache, fake, _ = make()
    r = req()
    lkey = cache.redis_store.lkey(cache.key(r))
    looks: list[str] = []

    async def dispatch() -> Completion:
        if not looks:
            fake.data.pop(lkey.encode(), None)  # the restart
        await asyncio.sleep(0.05)  # waiting for a slot: the background release runs
        try:
            await check_claim()
        except ClaimLost:
            looks.append("lost")
            raise
        looks.append("called")
        return comp()

    got = await asyncio.wait_for(cache.coalesce(r, cache.key(r), dispatch), 2.0)
    assert not got.cached and looks == ["lost", "called"]
    assert fake._get(lkey) is None and await looked(cache, r) is not None


async def test_a_beat_renews_many_held_locks_without_a_task_per_lock() -> None:
    # A worker reading ahead holds a lock per queued miss: thousands. A beat made a task per
    # lock (asyncio.gather over coroutines): 7.5 us per request of the miss path's CPU.
    cache, fake, _ = make(coalesce_lock_seconds=0.3)  # renewed every 100 ms
    loop = asyncio.get_running_loop()
    counting = False
    created = 0

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        nonlocal created
        created += counting
        return asyncio.Task(coro, loop=loop, **kw)

    def slow(key: str) -> Any:
        async def compute() -> Completion:
            await asyncio.sleep(0.35)
            return comp()

        return compute

    rs = [req(f"p{i}") for i in range(300)]
    loop.set_task_factory(factory)
    try:
        runs = asyncio.gather(*(cache.coalesce(r, cache.key(r), slow(cache.key(r))) for r in rs))
        await asyncio.sleep(0.05)  # every lock taken
        counting = True
        await asyncio.sleep(0.25)  # two beats, 300 locks each
        counting = False
        await runs
    finally:
        loop.set_task_factory(None)
    assert all(fake._get(cache.redis_store.lkey(cache.key(r))) is None for r in rs)  # released
    assert created < 20, created


async def test_the_renewals_of_many_leaders_share_pipelines() -> None:
    cache, fake, _ = make(coalesce_lock_seconds=0.3)  # renewed every 100 ms
    held: list[bool] = []

    def slow(key: str) -> Any:
        async def compute() -> Completion:
            await asyncio.sleep(0.5)
            held.append(fake._get(cache.redis_store.lkey(key)) is not None)
            return comp()

        return compute

    rs = [req(f"p{i}") for i in range(50)]
    await asyncio.gather(*(cache.coalesce(r, cache.key(r), slow(cache.key(r))) for r in rs))
    assert held == [True] * 50  # every lock outlived its 300 ms expiry
    # 50 locks, ~4 renewals each: one batch (a script on one server) per tick, not one each
    assert fake.batches() < 20


async def test_a_stop_does_not_wait_for_lock_renewals() -> None:
    # A leader still computing at a stop keeps renewing its lock; a renewal stuck on a slow
    # Redis (up to redis.socket_timeout_seconds, 1 s) must not hold the stop.
    cache, fake, _ = make(coalesce_lock_seconds=0.3)  # renewed every 100 ms
    r = req()
    leader = asyncio.ensure_future(cache.coalesce(r, cache.key(r), counting(comp(), delay=30)[0]))
    await asyncio.sleep(0.05)
    fake.delay = 30.0  # from now on Redis does not answer: the next renewal hangs
    await asyncio.sleep(0.15)
    await asyncio.wait_for(cache.aclose(), 0.5)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_coalescing_survives_redis_outage_in_process() -> None:
    cache, fake, reg = make()
    fake.fail = True
    compute, calls = counting(comp())
    r = req()
    out = await asyncio.gather(*(answered(cache, r, compute) for _ in range(20)))
    assert calls["n"] == 1 and len(out) == 20
    assert metric(reg, "errors", op="read") >= 1


async def test_context_manager_flushes_pending_writes() -> None:
    fake = FakeRedis()
    async with ResponseCache(settings(), fake, CollectorRegistry()) as cache:  # type: ignore[arg-type]
        task = asyncio.ensure_future(cache.store(req(), comp()))
        await asyncio.sleep(0)
    await task
    assert len(fake.data) == 1


async def test_prefetch_is_recall_and_lookup_in_one_round_trip() -> None:
    cache, fake, _ = make()
    a, b, c = req("a", id="ra"), req("b", id="rb"), req("c", id="rc", cache={"no_cache": True})
    await cache.store(a, comp("A"))
    await cache.store(c, comp("C"))
    await cache.remember(cache.ref(b, "t"), b"stored record")
    fake.round_trips.clear()
    got = await cache.prefetch([a, b, c], ["t"] * 3)
    assert [p.key for p in got] == [cache.key(a), cache.key(b), cache.key(c)]
    assert got[0].recalled is None and got[0].hit is not None
    assert got[0].hit.cached and got[0].hit.output == "A"
    assert got[1].recalled == Recalled("response", b"stored record") and got[1].hit is None
    assert got[2].recalled is None and got[2].hit is None  # no_cache: never served a stored answer
    assert fake.round_trips == {"mget": 1}  # three recalls and two lookups, one round trip


# -- idempotency: tenant and content ---------------------------------------------------


async def test_an_id_reused_with_other_content_is_answered_afresh_never_replayed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(1000.0)
    cache, fake, reg = make(clock=clock, error_log_interval_seconds=10)
    caplog.set_level(logging.WARNING, logger="streams.cache")
    first = ref(cache, "job-1", input="first prompt", metadata={"row": 1})
    await cache.remember(first, b'{"output":"first"}')
    assert await recalled(cache, "job-1", input="first prompt", metadata={"row": 1}) == Recalled(
        "response", b'{"output":"first"}')  # a redelivery: replayed
    assert metric(reg, "idempotency_conflicts") == 0
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("llm.requests", {"input": "second prompt", "metadata": {"row": 1}}),
        ("llm.requests", {"input": "first prompt", "metadata": {"row": 2}}),  # metadata alone
        ("other.topic", {"input": "first prompt", "metadata": {"row": 1}}),
    ]
    others = [ref(cache, "job-1", topic, **kw) for topic, kw in kinds]
    for other, (topic, kw) in zip(others, kinds, strict=True):
        assert other.key == first.key and other.fingerprint != first.fingerprint
        assert await recalled(cache, "job-1", topic, **kw) is None
    assert metric(reg, "idempotency_conflicts") == 3
    logged = [r for r in caplog.records if "reused with other content" in r.getMessage()]
    assert len(logged) == 1  # at most one line per interval
    clock.now += 11
    assert await recalled(cache, "job-1", **kinds[0][1]) is None
    logged = [r for r in caplog.records if "reused with other content" in r.getMessage()]
    assert len(logged) == 2 and "(3 such since last report)" in logged[1].getMessage()
    # the fresh answer replaces the record: the latest content of an id is the one replayed
    await cache.remember(others[0], b'{"output":"second"}')
    assert await recalled(cache, "job-1", **kinds[0][1]) == Recalled("response", b'{"output":"second"}')
    assert await recalled(cache, "job-1", input="first prompt", metadata={"row": 1}) is None
    assert len(fake.data) == 1


async def test_no_tenant_can_read_another_tenants_record() -> None:
    cache, fake, reg = make()
    mine = ref(cache, "job-1", tenant="a", metadata={"secret": "a's"})
    await cache.remember(mine, b'{"metadata":{"secret":"a\'s"}}')
    for tenant in ("b", None, "", "A", "a "):
        theirs = ref(cache, "job-1", tenant=tenant, metadata={"secret": "a's"})
        assert theirs.key != mine.key  # scoped by the key itself, not a check after reading
        assert await recalled(cache, "job-1", tenant=tenant, metadata={"secret": "a's"}) is None
    assert metric(reg, "idempotency_conflicts") == 0  # nothing of a's was even read
    assert list(fake.data) == [mine.key.encode()]
    assert mine.key.startswith("llmstreams:r:") and "job-1" not in mine.key


async def test_a_no_store_answer_is_kept_only_while_it_can_be_redelivered() -> None:
    cache, fake, _ = make(no_store_idempotency_ttl_seconds=900, idempotency_ttl_seconds=86_400)
    plain, private = ref(cache, "a"), ref(cache, "b", cache={"no_store": True})
    assert (plain.ttl, private.ttl) == (86_400, 900)
    await cache.remember(plain, b"{}")
    await cache.remember(private, b"{}")
    ttl = fake.ttl(private.key)
    assert ttl is not None and 899 < ttl <= 900
    short, _, _ = make(no_store_idempotency_ttl_seconds=900, idempotency_ttl_seconds=60)
    assert ref(short, "b", cache={"no_store": True}).ttl == 60  # never longer than any record


async def test_idempotency_store_works_with_the_response_cache_disabled() -> None:
    cache, fake, reg = make(enabled=False)
    r = req(id="x")
    await cache.remember(cache.ref(r, "t"), b"stored")
    fake.round_trips.clear()
    (got,) = await cache.prefetch([r], ["t"])
    assert got.recalled == Recalled("response", b"stored") and got.hit is None
    assert fake.round_trips == {"mget": 1}
    assert metric(reg, "misses", model="m") == 0  # no cache lookup at all


async def test_prefetch_of_a_conflicting_id_looks_up_the_cache_in_the_same_round_trip() -> None:
    cache, fake, reg = make()
    old, new = req("old", id="j"), req("new", id="j")
    await cache.remember(cache.ref(old, "t"), b"old record")
    await cache.store(new, comp("cached answer for new"))
    fake.round_trips.clear()
    (got,) = await cache.prefetch([new], ["t"])
    assert got.recalled is None and got.hit is not None
    assert got.hit.output == "cached answer for new"
    assert fake.round_trips == {"mget": 1} and metric(reg, "idempotency_conflicts") == 1


# -- command errors are not outages ----------------------------------------------------


async def test_a_set_argument_error_fails_that_write_only_and_keeps_the_circuit_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, fake, reg = make(clock=Clock(1000.0), redis_retry_seconds=60.0)
    caplog.set_level(logging.WARNING, logger="streams.cache")
    huge = req("huge ttl", cache={"ttl": 10**16})  # beyond what Redis accepts for EX
    await asyncio.gather(cache.store(huge, comp()), cache.store(req("fine"), comp()))
    assert fake.round_trips["pipeline"] == 1
    assert metric(reg, "errors", op="write") == 1
    assert metric(reg, "writes", store="cache") == 1  # the other write of the pipeline counts
    assert metric(reg, "skipped_writes", reason="redis_unavailable") == 1
    hit = await looked(cache, req("fine"))  # the circuit stayed closed: Redis still in use
    assert hit is not None and fake.round_trips["mget"] == 1
    compute, calls = counting(comp())
    await answered(cache, req("locked"), compute)
    assert fake.round_trips["eval"] >= 2  # coalescing locks still go to Redis (a script a batch)
    (line,) = [r.getMessage() for r in caplog.records if "redis" in r.getMessage()]
    assert "refused a command" in line and "invalid expire time" in line
    assert "huge ttl" not in line and "bypassed" not in line


async def test_a_command_error_on_a_read_does_not_open_the_circuit() -> None:
    from redis.exceptions import ResponseError

    cache, fake, reg = make(clock=Clock(1000.0), redis_retry_seconds=60.0)
    fake.fail, fake.error = True, ResponseError("WRONGTYPE Operation against a key holding "
                                                "the wrong kind of value")
    assert await looked(cache, req()) is None
    fake.fail = False
    await cache.store(req(), comp())
    assert await looked(cache, req()) is not None
    assert fake.round_trips["mget"] == 2 and metric(reg, "errors", op="read") == 1


@pytest.mark.parametrize("error", ["OOM command not allowed when used memory > 'maxmemory'",
                                   "READONLY You can't write against a read only replica.",
                                   "MISCONF Redis is configured to save RDB snapshots"])
async def test_server_state_errors_still_open_the_circuit(error: str) -> None:
    from redis._parsers.base import BaseParser

    cache, fake, _ = make(clock=Clock(1000.0), redis_retry_seconds=60.0)
    fake.fail, fake.error = True, BaseParser.parse_error(error)
    assert await looked(cache, req()) is None
    assert fake.round_trips["mget"] == 3  # an outage: tried again, unlike a command error
    fake.fail = False
    await cache.store(req(), comp())
    assert cache.redis_store.guard.degraded and fake.round_trips["pipeline"] == 0  # bypassed


# -- one call per request id where the content's lock does not apply ------------------------


async def _twice_at_once(control: dict[str, Any], enabled: bool = True,
                         other: dict[str, Any] | None = None) -> tuple[int, list[Completion]]:
    """Two workers (caches on one Redis) each get the same record at once (a rebalance's
    redelivery while the first owner still calls); ``other``: the second's record differs."""
    fake = FakeRedis()
    a, _, _ = make(fake, enabled=enabled)
    b, _, _ = make(fake, enabled=enabled)
    calls = 0
    go = asyncio.Event()

    async def compute() -> Completion:
        nonlocal calls
        calls += 1
        await go.wait()
        return comp()

    ra = req(cache=control) if control else req()
    rb = req(**(other or {}), **({"cache": control} if control else {}))
    runs = []
    for c, r in ((a, ra), (b, rb)):
        (got,) = await c.prefetch([r], ["llm.requests"])
        runs.append(asyncio.ensure_future(c.coalesce(r, got.key, compute, got.ref)))
        await asyncio.sleep(0.05)  # the first holds its lock before the second asks
    go.set()
    return calls, list(await asyncio.gather(*runs))


@pytest.mark.parametrize(("control", "enabled"), [
    ({}, False), ({"no_cache": True}, True), ({"no_store": True}, True), ({"no_store": True}, False),
])
async def test_a_record_delivered_twice_at_once_is_paid_once(
    control: dict[str, Any], enabled: bool,
) -> None:
    # Before: with the cache off, no_cache or no_store the content's lock did not apply, and
    # a redelivery to a partition's new owner while its first owner still called paid twice.
    calls, (first, second) = await _twice_at_once(control, enabled)
    assert calls == 1
    assert not first.cached and second.cached and second.body == first.body


async def test_an_id_reused_with_other_content_is_not_served_the_first_ones_answer() -> None:
    calls, (first, second) = await _twice_at_once({}, False, other={"input": "another prompt"})
    assert calls == 2 and not first.cached and not second.cached


async def test_the_answer_under_the_id_lives_only_while_a_waiter_may_wait() -> None:
    cache, fake, _ = make(enabled=False, coalesce_wait_seconds=5, coalesce_lock_seconds=2)
    r = req()
    (got,) = await cache.prefetch([r], ["llm.requests"])
    await cache.coalesce(r, got.key, lambda: asyncio.sleep(0, comp()), got.ref)
    ckey = cache.redis_store.ckey(cache.id_key(r, got.ref))
    assert fake._get(ckey) is not None
    assert 0 < (fake.ttl(ckey) or 0) <= 7
    assert fake._get(cache.redis_store.lkey(cache.id_key(r, got.ref))) is None  # released
    assert fake._get(cache.redis_store.ckey(cache.key(r))) is None  # the cache stays off


async def test_no_store_still_shares_one_call_within_a_process_across_ids() -> None:
    cache, _, _ = make()
    calls = 0

    async def compute() -> Completion:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return comp()

    rs = [req(id=f"r{i}", cache={"no_store": True}) for i in range(3)]
    found = await cache.prefetch(rs, ["llm.requests"] * 3)
    await asyncio.gather(*(cache.coalesce(r, g.key, compute, g.ref)
                           for r, g in zip(rs, found, strict=True)))
    assert calls == 1


async def test_a_lock_batch_whose_script_fails_goes_again_as_single_commands() -> None:
    # One item's command error aborts a batch script halfway (what it did stays done): the
    # batch then goes as a pipeline of single commands, so the other items still store their
    # answers and release their locks, and only the bad one fails.
    cache, fake, reg = make(clock=Clock(1000.0), redis_retry_seconds=60.0)
    locks = cache._locks
    await asyncio.gather(*(locks.try_lock(k, "t", 10_000) for k in ("a", "b", "c")))
    body = {"choices": [], "usage": {}}
    done = Completion(model="m", body=body, endpoint="e", attempts=1)
    await asyncio.gather(
        locks.finish("a", "t", done, 60),
        locks.finish("b", "t", done, 10**16),  # beyond what Redis accepts for EX
        locks.finish("c", "t", done, 60),
    )
    store = cache.redis_store
    assert [fake._get(store.lkey(k)) for k in "abc"] == [None, None, None]  # all released
    assert fake._get(store.ckey("a")) is not None and fake._get(store.ckey("c")) is not None
    assert fake._get(store.ckey("b")) is None
    assert fake.round_trips["eval"] == 2 and fake.round_trips["pipeline"] == 1
    assert metric(reg, "writes", store="cache") == 2
