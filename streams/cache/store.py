"""The cache's Redis access: batched reads and writes, key names, metrics, and a short circuit breaker.

Redis key layout (``prefix`` is ``redis.key_prefix``)::

    {prefix}:c:{tenant_tag}:{digest}   cached upstream body        (cache.ttl_seconds / req ttl)
    {prefix}:l:{tenant_tag}:{digest}   coalescing lock, PX         (cache.coalesce_lock_seconds)
    {prefix}:r:{tenant_tag}:{digest}   output record of an id      (cache.idempotency_ttl_seconds)

Reads are micro-batched: every read of one event-loop tick (or up to ``cache.batch_max_keys``)
shares one ``MGET``; writes share one pipeline (one Lua script on a single server). Redis
errors never reach the caller: reads answer ``DOWN``, writes are skipped and counted, and
after an outage error Redis is left alone for ``cache.redis_retry_seconds``
(``redis_guard.RedisGuard``). A ``force`` read or write (one that decides whether the upstream
is paid: the idempotency store's, a coalesced answer's) is tried even then, and again after an
outage error.

Usage::

    store = RedisStore(settings, redis_client, CacheMetrics(registry), clock)
    (raw,) = await store.read_many([store.ckey(key)])
    await store.write(store.ckey(key), value, ttl, "cache")
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import ResponseError

from streams.cache.batching import Batcher
from streams.cache.codec import Body, Read, encode_value
from streams.config import Settings
from streams.logs import LogThrottle
from streams.redis_cluster import is_cluster, mget_by_slot
from streams.redis_guard import DOWN, RedisGuard, _Down, command_error_text
from streams.redis_io import RedisClient

log = logging.getLogger("streams.cache")

T = TypeVar("T")

# A batch of writes as one script: per key ``SET key value EX ttl`` (ARGV: value, ttl per key).
_SET_MANY = """
for i = 1, #KEYS do redis.call('set', KEYS[i], ARGV[2*i-1], 'EX', ARGV[2*i]) end
return #KEYS
"""


class CacheMetrics:
    """``llm_streams_cache_*`` counters on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, label: str) -> Counter:
            return Counter(f"llm_streams_cache_{name}", doc, [label], registry=registry)

        self.hits = counter("hits", "Requests answered from the response cache", "model")
        self.misses = counter("misses", "Cache lookups that found no answer", "model")
        self.writes = counter("writes", "Values written (cache or idempotency)", "store")
        self.skipped = counter("skipped_writes", "Writes not done, by reason", "reason")
        self.errors = counter("errors", "Redis errors, by operation", "op")
        self.coalesced = counter(
            "coalesced", "Requests answered by an identical request's upstream call", "scope"
        )
        self.fallbacks = counter(
            "coalesce_fallbacks", "Coalesced waiters that computed themselves", "reason"
        )
        self.replays = counter("idempotent_replays", "Redelivered ids republished", "kind")
        self.conflicts = Counter(
            "llm_streams_cache_idempotency_conflicts",
            "Request ids reused with other content: answered afresh, not replayed",
            registry=registry,
        )
        self.unchecked = Counter(
            "llm_streams_cache_idempotency_unchecked",
            "Requests answered without their idempotency check: Redis did not answer it",
            registry=registry,
        )
        self.circuit_open = Gauge(
            "llm_streams_cache_circuit_open",
            "1 from a Redis outage until a call succeeds again (the cache is bypassed meanwhile)",
            registry=registry,
        )


class _ErrorReport:
    """Counts every Redis error of the cache; logs at most one line per interval, with a count."""

    def __init__(self, metrics: CacheMetrics, clock: Callable[[], float], *, retry_seconds: float,
                 log_interval: float) -> None:
        self._metrics = metrics
        self._retry = retry_seconds
        self._throttle = LogThrottle(log_interval, clock)

    def __call__(self, op: str, exc: BaseException, outage: bool) -> None:
        self._metrics.errors.labels(op).inc()
        if not (count := self._throttle.due()):
            return
        if outage:
            log.warning(
                "redis error during %s (%s: %s); cache bypassed, retry every %.1fs "
                "(%d errors since last report)",
                op, type(exc).__name__, exc, self._retry, count,
            )
        else:
            log.warning(
                "redis refused a command during %s (%s); that command failed, the cache "
                "stays in use (%d errors since last report)",
                op, command_error_text(exc), count,
            )


class RedisStore:
    """Batched Redis reads and writes of the cache, its key names and its metrics.

    The Redis client must use ``decode_responses=False``; it is not closed here.
    """

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        metrics: CacheMetrics,
        clock: Callable[[], float],
    ) -> None:
        if redis.get_connection_kwargs().get("decode_responses"):
            raise ValueError("ResponseCache needs a Redis client with decode_responses=False")
        cfg = self._cfg = settings.cache
        self._prefix = settings.redis.key_prefix
        self.redis = redis
        self._cluster = is_cluster(redis)
        self.metrics = metrics
        self._timeout = settings.redis.socket_timeout_seconds
        self.guard = RedisGuard(
            clock=clock,
            retry_seconds=cfg.redis_retry_seconds,
            on_down=lambda exc: metrics.circuit_open.set(1),
            on_up=self._back,
            on_error=_ErrorReport(metrics, clock, retry_seconds=cfg.redis_retry_seconds,
                                  log_interval=cfg.error_log_interval_seconds),
        )
        self.tasks: set[asyncio.Task[None]] = set()
        # items carry a "force" flag: a batch holding one is tried even while the circuit is open
        self._reads: Batcher[tuple[str, bool], Read] = Batcher(self._mget, cfg.batch_max_keys, self.tasks)
        self._writes: Batcher[tuple[str, bytes, int, bool], bool] = Batcher(
            self._pipeline_set, cfg.batch_max_keys, self.tasks
        )

    def _back(self) -> None:
        self.metrics.circuit_open.set(0)
        log.info("redis is reachable again; cache back in use")

    async def call(self, op: str, fn: Callable[[], Awaitable[T]], force: bool = False) -> T | _Down:
        """``fn()`` through the guard (DOWN: Redis did not answer or is left alone).

        ``force``: a call that decides whether the upstream is paid. It is tried even while
        the circuit is open, and again after an outage error (``cache.redis_attempts``), so
        one command timed out by a lagging event loop does not pay a redelivery twice.
        """
        if not force:
            return await self.guard.call(op, fn, timeout=self._timeout)
        return await self.guard.call(op, fn, timeout=self._timeout, force=True,
                                     attempts=self._cfg.redis_attempts,
                                     backoff=self._cfg.redis_backoff_seconds)

    def ckey(self, key: str) -> str:
        """The Redis key of a cached answer."""
        return f"{self._prefix}:c:{key}"

    def lkey(self, key: str) -> str:
        """The Redis key of a coalescing lock."""
        return f"{self._prefix}:l:{key}"

    def rkey(self, key: str) -> str:
        """The Redis key of an id's remembered output record."""
        return f"{self._prefix}:r:{key}"

    def encode(self, body: Body) -> bytes | None:
        """A body as a stored value, or None (counted) if it cannot or must not be stored."""
        try:
            data = orjson.dumps(body)
        except (orjson.JSONEncodeError, TypeError):
            self.metrics.skipped.labels("unserializable").inc()
            return None
        value = encode_value(data, self._cfg.compress_min_bytes)
        if len(value) > self._cfg.max_value_bytes:  # stored size: what costs Redis memory
            self.metrics.skipped.labels("too_large").inc()
            return None
        return value

    async def read_many(self, keys: list[str], force: bool = False) -> list[Read]:
        """The values of ``keys`` (None: missing; DOWN: Redis did not answer)."""
        if not force and not self.guard.available():  # circuit open: no future, no round trip
            return [DOWN] * len(keys)
        futs = [self._reads.submit((k, force)) for k in keys]
        return [await f for f in futs]

    async def write(self, key: str, value: bytes, ttl: int, store: str, force: bool = False) -> bool:
        """Set ``key`` for ``ttl`` seconds; counted under ``store``, or as skipped. True when
        Redis took it."""
        ok = (force or self.guard.available()) and await self._writes.submit((key, value, ttl, force))
        if ok:
            self.metrics.writes.labels(store).inc()
        else:
            self.metrics.skipped.labels("redis_unavailable").inc()
        return bool(ok)

    def flush(self) -> None:
        """Send the pending reads and writes now."""
        self._reads.flush()
        self._writes.flush()

    async def _mget(self, items: list[tuple[str, bool]]) -> list[Read]:
        keys = [k for k, _ in items]
        unique = list(dict.fromkeys(keys))  # identical requests of one tick: fetch once
        res = await self.call("read", lambda: self._mget_unique(unique),
                              force=any(f for _, f in items))
        if res is DOWN:
            return [DOWN] * len(keys)
        found = dict(zip(unique, res, strict=True))
        return [found[k] for k in keys]

    async def _mget_unique(self, keys: list[str]) -> list[bytes | None]:
        if self._cluster:  # MGET takes one slot's keys: one per slot, pipelined per node
            return await mget_by_slot(self.redis, keys)  # type: ignore[arg-type]
        return await cast(Awaitable[list[bytes | None]], self.redis.mget(keys))

    @property
    def scripted(self) -> bool:
        """Whether a batch of commands goes as one Lua script (a single server) or as a
        pipeline of single commands (a cluster: a batch's keys sit in many slots)."""
        return not self._cluster

    async def run_script(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        """A batch script's reply, or None if Redis refused it with a command error (the
        caller then sends the batch as a pipeline, whose replies say which item failed).

        One script per batch instead of a command per item: redis-py's asyncio client
        spends more CPU per command (packing, a timeout per reply, parsing) than Redis does
        running it."""
        try:
            return await self.redis.eval(script, len(keys), *keys, *args)
        except ResponseError:
            return None

    async def _pipeline_set(self, items: list[tuple[str, bytes, int, bool]]) -> list[bool]:
        async def go() -> list[Any]:
            if self.scripted:
                args: list[Any] = []
                for _, value, ttl, _ in items:
                    args += (value, ttl)
                done = await self.run_script(_SET_MANY, [i[0] for i in items], args)
                if done is not None:
                    return [True] * len(items)
            pipe = self.redis.pipeline(transaction=False)
            for key, value, ttl, _ in items:
                pipe.set(key, value, ex=ttl)
            return await pipe.execute(raise_on_error=False)

        res = await self.call("write", go, force=any(i[3] for i in items))
        if res is DOWN:
            return [False] * len(items)
        return self.guard.replies("write", res)
