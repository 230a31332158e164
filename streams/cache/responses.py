"""The response cache: pay once per answer (lookup, store, coalescing), in front of the idempotency store.

One ``ResponseCache`` per worker and registry composes the parts of this package: the
Redis access (``store``, as ``redis_store``), the idempotency store (``idempotency``), the coalescer
(``coalesce``) on its Redis locks (``locks``). Redis errors never reach the caller: reads
miss, writes are skipped, coalescing stays in-process (``store``, as ``redis_store``).

With ``cache.enabled: false`` the response cache and the coalescing of identical content are
off; the idempotency store still works, and so does the coalescing of one request id
(``coalesce`` with the request's ``IdemRef``: a record delivered twice at once is paid once).

Usage::

    async with ResponseCache(settings, redis_client, registry) as cache:
        (got,) = await cache.prefetch([req], [source_topic])   # one round trip per batch
        if got.recalled is not None: ...   # a redelivery: republish, cache.note_replay()
        elif got.hit is not None: ...      # a cached answer
        else:
            comp = await cache.coalesce(req, got.key, lambda: dispatcher.dispatch(req), got.ref)
            await cache.remember(got.ref, response_record_bytes)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter

from streams.cache.coalesce import Coalescer
from streams.cache.codec import Read, cached_completion, decode_body
from streams.cache.idempotency import IdempotencyStore, IdemRef, Kind, Recalled
from streams.cache.keys import cache_key, idem_key
from streams.cache.locks import RedisLocks
from streams.cache.store import CacheMetrics, RedisStore
from streams.config import Settings
from streams.contract import Completion, Request
from streams.redis_io import RedisClient

# Model names come from requests: cap the label set so a flood of odd names cannot blow
# up the metrics' memory; later models are counted under "other".
MAX_MODEL_LABELS = 64


class Prefetched(NamedTuple):
    """What one round trip knows of a request: its cache key, its idempotency ref, its
    remembered output, a hit."""

    key: str
    ref: IdemRef
    recalled: Recalled | None
    hit: Completion | None


class ResponseCache:
    """Response cache + idempotency store + coalescing. One per worker and registry.

    The Redis client must use ``decode_responses=False``; it is not closed here.
    Bodies handed out are shared between callers: treat them as read-only.
    """

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cfg = self._cfg = settings.cache
        self.metrics = CacheMetrics(registry)
        self.redis_store = RedisStore(settings, redis, self.metrics, clock)
        self.idempotency = IdempotencyStore(settings, self.redis_store, clock)
        self._models: dict[str, tuple[Counter, Counter]] = {}
        self._locks = RedisLocks(self.redis_store, cfg.batch_max_keys)
        self.coalescer = Coalescer(
            self._locks,
            wait_seconds=cfg.coalesce_wait_seconds,
            lock_seconds=cfg.coalesce_lock_seconds,
            poll_seconds=cfg.coalesce_poll_seconds,
            clock=clock,
            on_coalesced=lambda scope: self.metrics.coalesced.labels(scope).inc(),
            on_fallback=lambda reason: self.metrics.fallbacks.labels(reason).inc(),
        )

    # -- response cache -------------------------------------------------------------

    def key(self, req: Request) -> str:
        """The request's cache key (see ``streams.cache.keys.cache_key``)."""
        return cache_key(req, self._cfg.normalize)

    def _hit(self, req: Request, raw: Read) -> Completion | None:
        model = req.model or ""
        body = decode_body(raw) if isinstance(raw, bytes) else None
        hits, misses = self._model_counters(model)
        if body is None:
            misses.inc()
            return None
        hits.inc()
        return cached_completion(body, model)

    async def prefetch(self, reqs: list[Request], topics: list[str]) -> list[Prefetched]:
        """The remembered output and the cached answer of many requests in one round trip.

        ``topics[i]`` is the topic ``reqs[i]`` was read from. The batch path of a worker: a
        miss goes on with ``coalesce(req, p.key, ...)`` and ``remember(p.ref, ...)``.
        """
        refs = [self.ref(r, t) for r, t in zip(reqs, topics, strict=True)]
        enabled = self._cfg.enabled
        looked = [enabled and not r.cache.no_cache for r in reqs]
        keys = [self.key(r) if enabled else "" for r in reqs]  # coalesce() needs none when off
        wanted = [ref.key for ref in refs]
        wanted += [self.redis_store.ckey(k) for k, on in zip(keys, looked, strict=True) if on]
        raws = await self.redis_store.read_many(wanted, force=True)  # the idempotency store is never skipped
        cached = iter(raws[len(reqs):])
        out = []
        for req, key, ref, raw, on in zip(reqs, keys, refs, raws, looked, strict=False):
            rec = self.idempotency.check(raw, ref)
            hit = None
            if on:
                craw = next(cached)
                if rec is None or rec.kind != "response":  # a replay needs no answer
                    hit = self._hit(req, craw)
            out.append(Prefetched(key, ref, rec, hit))
        return out

    async def store(self, req: Request, comp: Completion, key: str | None = None) -> None:
        """Cache a fresh answer for ``req.cache.ttl`` or ``cache.ttl_seconds`` (an answer
        computed outside ``coalesce``, which stores its own)."""
        if not self._cfg.enabled or req.cache.no_store or comp.cached:
            return
        value = self.redis_store.encode(comp.body)
        if value is not None:
            ttl = req.cache.ttl or self._cfg.ttl_seconds
            await self.redis_store.write(self.redis_store.ckey(key or self.key(req)), value, ttl, "cache")

    def coalesce(
        self, req: Request, key: str, compute: Callable[[], Awaitable[Completion]],
        ref: IdemRef | None = None,
    ) -> Awaitable[Completion]:
        """Run ``compute`` once for all identical requests in flight; store its answer.

        Waiters get the leader's answer as ``cached=True``; if the leader fails they run
        their own ``compute``. Do not ``store()`` the result again. Where the answer's content
        is not shared (the cache off, ``no_cache``, ``no_store``), ``ref`` (the request's
        idempotency ref) still makes one call of one id and content across workers
        (``_by_id``); without it, the cache off is ``compute()`` itself.
        """
        cfg = self._cfg
        if ref is not None and (not cfg.enabled or req.cache.no_cache or req.cache.no_store):
            return self._by_id(req, key, compute, ref)
        if not cfg.enabled:
            return compute()
        return self._coalesce(req, key, compute)

    async def _coalesce(
        self, req: Request, key: str, compute: Callable[[], Awaitable[Completion]]
    ) -> Completion:
        if req.cache.no_cache:  # must not be served someone else's answer, but may store its own
            comp = await compute()
            await self.store(req, comp, key)
            return comp
        no_store = req.cache.no_store
        ttl = None if no_store else (req.cache.ttl or self._cfg.ttl_seconds)
        # no_store answers never reach Redis, so other processes could not read them.
        return await self.coalescer.run(key, req.model or "", compute, remote=not no_store, ttl=ttl)

    def id_key(self, req: Request, ref: IdemRef) -> str:
        """The coalescing key of one request id (in its tenant) and content: ``idem_key``
        plus the content's fingerprint, so an id reused with other content is apart."""
        return f"{idem_key(req.tenant, req.id)}:{ref.fingerprint.hex()}"

    async def _by_id(
        self, req: Request, key: str, compute: Callable[[], Awaitable[Completion]],
        ref: IdemRef,
    ) -> Completion:
        """One upstream call per request id and content, across workers, where the content's
        lock does not apply: a record delivered twice at once (redelivered to the partition's
        new owner by a rebalance while its first owner still calls; a producer's retry) waits
        for the first one's answer instead of paying for it again. The answer is kept under
        the id's key only as long as a waiter may wait for it (``coalesce_wait_seconds``
        plus a lock's life, at most the id's idempotency ttl); identical content under other
        ids shares one call within a process for ``no_store`` (as before), and ``no_cache``
        stores its answer for others (as before)."""
        cfg = self._cfg
        ttl = max(1, min(ref.ttl, math.ceil(cfg.coalesce_wait_seconds + cfg.coalesce_lock_seconds)))
        if cfg.enabled and req.cache.no_store:
            compute = partial(self.coalescer.run, key, req.model or "", compute,
                              remote=False, ttl=None)
        comp = await self.coalescer.run(self.id_key(req, ref), req.model or "", compute,
                                        remote=True, ttl=ttl)
        if req.cache.no_cache:
            await self.store(req, comp, key)  # a fresh answer only (``store`` skips the rest)
        return comp

    # -- idempotency store ----------------------------------------------------------

    def ref(self, req: Request, topic: str) -> IdemRef:
        """Where ``req`` (read from ``topic``) is remembered (``IdempotencyStore.ref``)."""
        return self.idempotency.ref(req, topic)

    async def remember(
        self, ref: IdemRef, value: bytes, kind: Kind = "response", ttl: int | None = None
    ) -> bool:
        """Keep the exact output record (``IdempotencyStore.remember``); True when kept."""
        return await self.idempotency.remember(ref, value, kind, ttl)

    def note_replay(self, kind: Kind = "response") -> None:
        """Count a redelivered id answered from the idempotency store."""
        self.idempotency.note_replay(kind)

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> ResponseCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Send what is pending and wait for it (does not close the Redis client)."""
        self.redis_store.flush()
        self._locks.flush()
        self._locks.stop_renewals()
        while self.redis_store.tasks:
            await asyncio.gather(*self.redis_store.tasks, return_exceptions=True)
        await self.coalescer.aclose()

    def _model_counters(self, model: str) -> tuple[Counter, Counter]:
        pair = self._models.get(model)
        if pair is None:
            label = model if len(self._models) < MAX_MODEL_LABELS else "other"
            pair = (self.metrics.hits.labels(label), self.metrics.misses.labels(label))
            if label == model:
                self._models[model] = pair
        return pair
