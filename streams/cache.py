"""Pay once per answer: response cache, idempotency store and coalescing, on Redis.

Redis key layout (``prefix`` is ``redis.key_prefix``)::

    {prefix}:c:{tenant_tag}:{digest}   cached upstream body        (cache.ttl_seconds / req ttl)
    {prefix}:l:{tenant_tag}:{digest}   coalescing lock, PX         (cache.coalesce_lock_seconds)
    {prefix}:r:{tenant_tag}:{digest}   output record of an id      (cache.idempotency_ttl_seconds;
                                       in its tenant               no_store: at most
                                                                   cache.no_store_idempotency_ttl_seconds)

Values start with a format byte: ``\\x00`` raw orjson bytes, ``\\x01`` zlib of them.
Idempotency values have a kind byte first (``r`` response, ``d`` dead letter), then the
16-byte fingerprint of the request's content (``cachekey.fingerprint``): a record is
republished only for a request of the same content. The same id with other content is a
conflict: answered afresh (its record then replaces the old one), counted, never served
the other request's record.

Reads are micro-batched: every lookup/recall/poll of one event-loop tick (or up to
``cache.batch_max_keys``) shares one ``MGET``; writes share one pipeline. Redis errors
never reach the caller: reads miss, writes are skipped, coalescing stays in-process, and
after an outage error Redis is left alone for ``cache.redis_retry_seconds`` so an outage
adds no latency per request. An error about one command's arguments (a TTL out of range)
fails that command only (``redis_io.is_outage``). The idempotency store is the exception to
the circuit: its reads and writes are tried even then (still batched, each batch bounded by
the socket timeout), since one slow command under load would otherwise skip the records of
a whole second and let their redeliveries call the upstream again.

With ``cache.enabled: false`` the response cache and coalescing are off; the idempotency
store still works.

Usage::

    async with ResponseCache(settings, redis_client, registry) as cache:
        ref = cache.ref(req, source_topic)
        if (record := await cache.recall(ref)) is not None:
            ...  # a redelivery: republish record, cache.note_replay()
        comp = await cache.answer(req, lambda: dispatcher.dispatch(req))
        await cache.remember(ref, response_record_bytes)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, Literal, NamedTuple, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge

from streams.cachekey import FINGERPRINT_SIZE, cache_key, fingerprint, idem_key
from streams.coalesce import Body, Coalescer, LockState
from streams.config import Settings
from streams.contract import Completion, Request
from streams.logs import request_extra
from streams.redis_io import REDIS_ERRORS, command_error_text, is_outage

log = logging.getLogger(__name__)

RAW = b"\x00"
ZLIB = b"\x01"
Kind = Literal["response", "dead_letter"]
_KIND_BYTE: dict[str, bytes] = {"response": b"r", "dead_letter": b"d"}
_BYTE_KIND: dict[bytes, Kind] = {b"r": "response", b"d": "dead_letter"}
# Model names come from requests: cap the label set so a flood of odd names cannot blow
# up the metrics' memory; later models are counted under "other".
MAX_MODEL_LABELS = 64

# Compare-and-delete / compare-and-extend: only the holder's token may touch its lock.
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_EXTEND = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)

T = TypeVar("T")
R = TypeVar("R")


class _Down(enum.Enum):
    DOWN = "down"


DOWN = _Down.DOWN  # "Redis did not answer", distinct from a None (missing key)
Read = bytes | None | _Down


class Recalled(NamedTuple):
    """An output record remembered for a request id."""

    kind: Kind
    value: bytes


class IdemRef(NamedTuple):
    """Where one request's output is remembered, and what it must match (``ResponseCache.ref``)."""

    key: str  # the Redis key: tenant and id
    fingerprint: bytes  # of the request's whole content and source topic
    ttl: int  # seconds to remember its output
    request_id: str


_HEAD = 1 + FINGERPRINT_SIZE  # kind byte, fingerprint


def _recalled(raw: Read, ref: IdemRef) -> Recalled | Literal[False] | None:
    """The record remembered for ``ref``; False if the id holds another content's record."""
    if not isinstance(raw, bytes):
        return None
    kind = _BYTE_KIND.get(raw[:1])
    if kind is None or len(raw) < _HEAD:
        return None
    if raw[1:_HEAD] != ref.fingerprint:
        return False
    payload = decode_value(raw[_HEAD:])
    return None if payload is None else Recalled(kind, bytes(payload))


class Prefetched(NamedTuple):
    """What one round trip knows of a request: its cache key, its idempotency ref, its
    remembered output, a hit."""

    key: str
    ref: IdemRef
    recalled: Recalled | None
    hit: Completion | None


def encode_value(data: bytes, compress_min_bytes: int) -> bytes:
    """Format byte + payload; zlib only when it is over the threshold and actually smaller."""
    if len(data) > compress_min_bytes:
        packed = zlib.compress(data, 6)
        if len(packed) < len(data):
            return ZLIB + packed
    return RAW + data


def decode_value(raw: bytes) -> bytes | memoryview | None:
    """The payload of an encoded value, or None for an unknown format or corrupt data."""
    marker = raw[:1]
    if marker == RAW:
        return memoryview(raw)[1:]  # no copy: orjson reads memoryviews
    if marker == ZLIB:
        try:
            return zlib.decompress(memoryview(raw)[1:])
        except zlib.error:
            return None
    return None


def decode_body(raw: bytes) -> Body | None:
    data = decode_value(raw)
    if data is None:
        return None
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


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
        self.circuit_open = Gauge(
            "llm_streams_cache_circuit_open",
            "1 from a Redis outage until a call succeeds again (the cache is bypassed meanwhile)",
            registry=registry,
        )


class _Guard:
    """Runs Redis calls with a timeout; translates errors; a short circuit breaker."""

    def __init__(
        self,
        metrics: CacheMetrics,
        clock: Callable[[], float],
        *,
        timeout: float,
        retry_seconds: float,
        log_interval: float,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._timeout = timeout
        self._retry = retry_seconds
        self._log_interval = log_interval
        self._open_until = float("-inf")
        self._last_log = float("-inf")
        self._unreported = 0
        self._down = False

    def available(self) -> bool:
        return self._clock() >= self._open_until

    async def call(self, op: str, fn: Callable[[], Awaitable[T]], force: bool = False) -> T | _Down:
        """``fn()``, or DOWN on a Redis error or while the circuit is open (unless ``force``)."""
        if not force and not self.available():
            return DOWN
        try:
            async with asyncio.timeout(self._timeout):
                result = await fn()
        except REDIS_ERRORS as exc:
            self.failed(op, exc)
            return DOWN
        if self._down:
            self._down = False
            self._metrics.circuit_open.set(0)
            log.info("redis is reachable again; cache back in use")
        return result

    def replies(self, op: str, results: list[Any]) -> list[bool]:
        """Which replies of a pipeline (run with ``raise_on_error=False``) succeeded.

        Each failed command is counted; one that speaks of an outage opens the circuit.
        """
        ok = []
        for result in results:
            failed = isinstance(result, BaseException)
            if failed:
                self.failed(op, result)
            ok.append(not failed)
        return ok

    def failed(self, op: str, exc: BaseException) -> None:
        """Count and log a Redis error; an outage (not a command's error) opens the circuit."""
        self._metrics.errors.labels(op).inc()
        now = self._clock()
        outage = is_outage(exc)
        if outage:
            self._open_until = now + self._retry
            self._down = True
            self._metrics.circuit_open.set(1)
        self._unreported += 1
        if now - self._last_log >= self._log_interval:  # at most one line per interval
            if outage:
                log.warning(
                    "redis error during %s (%s: %s); cache bypassed, retry every %.1fs "
                    "(%d errors since last report)",
                    op, type(exc).__name__, exc, self._retry, self._unreported,
                )
            else:
                log.warning(
                    "redis refused a command during %s (%s); that command failed, the cache "
                    "stays in use (%d errors since last report)",
                    op, command_error_text(exc), self._unreported,
                )
            self._last_log = now
            self._unreported = 0


class _Batcher(Generic[T, R]):
    """Collects items submitted in one loop tick (or up to ``max_items``) into one call."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        max_items: int,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._run = run
        self._max = max_items
        self._tasks = tasks
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled = False

    def submit(self, item: T) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut))
        if len(self._pending) >= self._max:
            self.flush()
        elif not self._scheduled:
            # call_soon runs after every callback already queued for this tick, so all
            # tasks woken together (e.g. one Kafka batch) land in the same round trip.
            self._scheduled = True
            loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except BaseException as exc:  # a bug, or cancellation: never leave a caller hanging
            for _, fut in batch:
                if fut.done():
                    continue
                if isinstance(exc, Exception):
                    fut.set_exception(exc)
                else:
                    fut.cancel()
            raise
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():  # the caller may have been cancelled meanwhile
                fut.set_result(result)


LockItem = tuple[str, str, int]  # key, token, ttl_ms
FinishItem = tuple[str, str, bytes | None, int]  # key, token, value to store, ttl


class _RedisLocks:
    """The coalescer's Redis side (``streams.coalesce.LockBackend``).

    Lock attempts and finishes of one loop tick share one pipeline each: a batch of misses
    costs two round trips, not two per request.
    """

    def __init__(self, cache: ResponseCache, max_items: int, tasks: set[asyncio.Task[None]]) -> None:
        self._c = cache
        self._locks: _Batcher[LockItem, tuple[LockState, Body | None]] = _Batcher(
            self._try_locks, max_items, tasks
        )
        self._finishes: _Batcher[FinishItem, None] = _Batcher(self._finish_many, max_items, tasks)

    def flush(self) -> None:
        self._locks.flush()
        self._finishes.flush()

    async def try_lock(self, key: str, token: str, ttl_ms: int) -> tuple[LockState, Body | None]:
        if not self._c._guard.available():
            return LockState.UNAVAILABLE, None
        return await self._locks.submit((key, token, ttl_ms))

    async def _try_locks(self, items: list[LockItem]) -> list[tuple[LockState, Body | None]]:
        c = self._c

        async def go() -> list[Any]:
            pipe = c._redis.pipeline(transaction=False)
            for key, token, ttl_ms in items:
                pipe.set(c._lkey(key), token, nx=True, px=ttl_ms)
                pipe.get(c._ckey(key))
            return await pipe.execute(raise_on_error=False)

        res = await c._guard.call("lock", go)
        if res is DOWN:
            return [(LockState.UNAVAILABLE, None)] * len(items)
        ok = c._guard.replies("lock", res)
        out: list[tuple[LockState, Body | None]] = []
        for i in range(len(items)):
            acquired, raw = res[2 * i], res[2 * i + 1]
            body = decode_body(raw) if isinstance(raw, bytes) else None
            if not ok[2 * i]:  # that lock command failed: proceed as if alone
                out.append((LockState.UNAVAILABLE, body))
            else:
                out.append(((LockState.ACQUIRED if acquired else LockState.HELD), body))
        return out

    async def peek(self, key: str) -> tuple[Body | None, bool] | None:
        raw, lock = await self._c._read_many([self._c._ckey(key), self._c._lkey(key)])
        if raw is DOWN or lock is DOWN:
            return None
        return (decode_body(raw) if raw is not None else None), lock is not None

    async def extend(self, key: str, token: str, ttl_ms: int) -> bool:
        c = self._c
        lkey = c._lkey(key)
        res = await c._guard.call("lock", lambda: c._redis.eval(_EXTEND, 1, lkey, token, ttl_ms))
        return res is DOWN or bool(res)  # Redis down: keep beating, it may come back

    async def finish(
        self, key: str, token: str | None, comp: Completion | None, ttl: int | None
    ) -> None:
        c = self._c
        value = None
        if comp is not None and ttl is not None and not comp.cached:
            value = c._encode(comp.body)
        if token is None:
            if value is not None:
                await c._write(c._ckey(key), value, ttl or 1, "cache")
            return
        if c._guard.available():
            await self._finishes.submit((key, token, value, ttl or 1))

    async def _finish_many(self, items: list[FinishItem]) -> list[None]:
        c = self._c

        async def go() -> list[Any]:
            pipe = c._redis.pipeline(transaction=False)
            for key, token, value, ttl in items:
                if value is not None:
                    pipe.set(c._ckey(key), value, ex=ttl)
                pipe.eval(_RELEASE, 1, c._lkey(key), token)
            return await pipe.execute(raise_on_error=False)

        res = await c._guard.call("lock", go)
        if res is not DOWN:
            ok = iter(c._guard.replies("lock", res))
            stored = 0
            for _, _, value, _ in items:
                if value is not None:
                    stored += next(ok)
                next(ok)  # the release
            if stored:
                c.metrics.writes.labels("cache").inc(stored)
        return [None] * len(items)


class ResponseCache:
    """Response cache + idempotency store + coalescing. One per worker and registry.

    The Redis client must use ``decode_responses=False``; it is not closed here.
    Bodies handed out are shared between callers: treat them as read-only.
    """

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if redis.get_connection_kwargs().get("decode_responses"):  # type: ignore[no-untyped-call]
            raise ValueError("ResponseCache needs a Redis client with decode_responses=False")
        cfg = self._cfg = settings.cache
        self._prefix = settings.redis.key_prefix
        self._redis = redis
        self.metrics = CacheMetrics(registry)
        self._guard = _Guard(
            self.metrics,
            clock,
            timeout=settings.redis.socket_timeout_seconds,
            retry_seconds=cfg.redis_retry_seconds,
            log_interval=cfg.error_log_interval_seconds,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        # items carry a "force" flag: a batch holding one is tried even while the circuit is open
        self._reads: _Batcher[tuple[str, bool], Read] = _Batcher(
            self._mget, cfg.batch_max_keys, self._tasks
        )
        self._writes: _Batcher[tuple[str, bytes, int, bool], bool] = _Batcher(
            self._pipeline_set, cfg.batch_max_keys, self._tasks
        )
        self._models: dict[str, tuple[Counter, Counter]] = {}
        self._clock = clock
        self._conflicts_logged = float("-inf")
        self._conflicts_unreported = 0
        self._locks = _RedisLocks(self, cfg.batch_max_keys, self._tasks)
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
        """The request's cache key (see ``streams.cachekey.cache_key``)."""
        return cache_key(req, self._cfg.normalize)

    async def lookup(self, req: Request, key: str | None = None) -> Completion | None:
        """The cached answer as ``cached=True``, or None (miss, no_cache, disabled, Redis down)."""
        if not self._cfg.enabled or req.cache.no_cache:
            return None
        (raw,) = await self._read_many([self._ckey(key or self.key(req))])
        return self._hit(req, raw)

    def _hit(self, req: Request, raw: Read) -> Completion | None:
        model = req.model or ""
        body = decode_body(raw) if isinstance(raw, bytes) else None
        hits, misses = self._model_counters(model)
        if body is None:
            misses.inc()
            return None
        hits.inc()
        return Completion(model=model, body=body, endpoint=None, attempts=0, cached=True)

    async def prefetch(self, reqs: list[Request], topics: list[str]) -> list[Prefetched]:
        """``recall_outcome`` and ``lookup`` of many requests in one round trip.

        ``topics[i]`` is the topic ``reqs[i]`` was read from. The batch path of a worker: a
        miss goes on with ``coalesce(req, p.key, ...)`` and ``remember(p.ref, ...)``.
        """
        refs = [self.ref(r, t) for r, t in zip(reqs, topics, strict=True)]
        enabled = self._cfg.enabled
        looked = [enabled and not r.cache.no_cache for r in reqs]
        keys = [self.key(r) if enabled else "" for r in reqs]  # coalesce() needs none when off
        wanted = [ref.key for ref in refs]
        wanted += [self._ckey(k) for k, on in zip(keys, looked, strict=True) if on]
        raws = await self._read_many(wanted, force=True)  # the idempotency store is never skipped
        cached = iter(raws[len(reqs):])
        out = []
        for req, key, ref, raw, on in zip(reqs, keys, refs, raws, looked, strict=False):
            rec = self._check(raw, ref)
            hit = None
            if on:
                craw = next(cached)
                if rec is None or rec.kind != "response":  # as recall() then lookup()
                    hit = self._hit(req, craw)
            out.append(Prefetched(key, ref, rec, hit))
        return out

    async def store(self, req: Request, comp: Completion, key: str | None = None) -> None:
        """Cache a fresh answer for ``req.cache.ttl`` or ``cache.ttl_seconds``."""
        if not self._cfg.enabled or req.cache.no_store or comp.cached:
            return
        value = self._encode(comp.body)
        if value is not None:
            ttl = req.cache.ttl or self._cfg.ttl_seconds
            await self._write(self._ckey(key or self.key(req)), value, ttl, "cache")

    async def coalesce(
        self, req: Request, key: str, compute: Callable[[], Awaitable[Completion]]
    ) -> Completion:
        """Run ``compute`` once for all identical requests in flight; store its answer.

        Waiters get the leader's answer as ``cached=True``; if the leader fails they run
        their own ``compute``. Do not ``store()`` the result again.
        """
        if not self._cfg.enabled:
            return await compute()
        if req.cache.no_cache:  # must not be served someone else's answer, but may store its own
            comp = await compute()
            await self.store(req, comp, key)
            return comp
        no_store = req.cache.no_store
        ttl = None if no_store else (req.cache.ttl or self._cfg.ttl_seconds)
        # no_store answers never reach Redis, so other processes could not read them.
        return await self.coalescer.run(key, req.model or "", compute, remote=not no_store, ttl=ttl)

    async def answer(
        self, req: Request, compute: Callable[[], Awaitable[Completion]]
    ) -> Completion:
        """lookup, else coalesce (which stores): the whole pay-once path in one call.

        A fresh answer is already stored: a later ``store()`` of it only rewrites the same value.
        """
        key = self.key(req)
        comp = await self.lookup(req, key)
        return comp if comp is not None else await self.coalesce(req, key, compute)

    # -- idempotency store ----------------------------------------------------------

    def ref(self, req: Request, topic: str) -> IdemRef:
        """Where ``req`` (read from ``topic``) is remembered: its tenant and id, its content.

        A ``no_store`` request is remembered only as long as a redelivery can come
        (``cache.no_store_idempotency_ttl_seconds``), others ``cache.idempotency_ttl_seconds``.
        """
        cfg = self._cfg
        ttl = cfg.idempotency_ttl_seconds
        if req.cache.no_store:
            ttl = min(ttl, cfg.no_store_idempotency_ttl_seconds)
        key = f"{self._prefix}:r:{idem_key(req.tenant, req.id)}"
        return IdemRef(key, fingerprint(req, topic), ttl, req.id)

    async def recall(self, ref: IdemRef) -> bytes | None:
        """The response record remembered for this request, or None (also when Redis is down,
        and when the id was last used with other content: a conflict, counted).

        Only ``kind="response"`` records: a remembered dead letter belongs on another topic,
        see ``recall_outcome``.
        """
        got = await self.recall_outcome(ref)
        return got.value if got is not None and got.kind == "response" else None

    async def recall_outcome(self, ref: IdemRef) -> Recalled | None:
        """The output record remembered for this request, with its kind, or None."""
        (raw,) = await self._read_many([ref.key], force=True)
        return self._check(raw, ref)

    async def recall_many(self, refs: list[IdemRef]) -> list[Recalled | None]:
        """``recall_outcome`` of each request; one round trip for all of them."""
        return list(await asyncio.gather(*(self.recall_outcome(ref) for ref in refs)))

    async def remember(
        self, ref: IdemRef, value: bytes, kind: Kind = "response", ttl: int | None = None
    ) -> None:
        """Keep the exact output record so a redelivery republishes it without upstream.

        It replaces whatever the id held (the latest content of an id wins).
        """
        encoded = (_KIND_BYTE[kind] + ref.fingerprint
                   + encode_value(value, self._cfg.compress_min_bytes))
        if len(encoded) > self._cfg.max_value_bytes:
            self.metrics.skipped.labels("too_large").inc()
            return
        await self._write(ref.key, encoded, ttl or ref.ttl, "idempotency", force=True)

    def note_replay(self, kind: Kind = "response") -> None:
        """Count a redelivered id answered from ``recall`` (the caller republishes)."""
        self.metrics.replays.labels(kind).inc()

    def _check(self, raw: Read, ref: IdemRef) -> Recalled | None:
        got = _recalled(raw, ref)
        if got is not False:
            return got
        self.metrics.conflicts.inc()
        self._conflicts_unreported += 1
        now = self._clock()
        if now - self._conflicts_logged >= self._cfg.error_log_interval_seconds:
            log.warning(
                "request id reused with other content: answered afresh, not replayed "
                "(%d such since last report)", self._conflicts_unreported,
                extra=request_extra(ref.request_id),
            )
            self._conflicts_logged = now
            self._conflicts_unreported = 0
        return None

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> ResponseCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Send what is pending and wait for it (does not close the Redis client)."""
        self._reads.flush()
        self._writes.flush()
        self._locks.flush()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.coalescer.aclose()

    # -- internals ------------------------------------------------------------------

    def _ckey(self, key: str) -> str:
        return f"{self._prefix}:c:{key}"

    def _lkey(self, key: str) -> str:
        return f"{self._prefix}:l:{key}"

    def _model_counters(self, model: str) -> tuple[Counter, Counter]:
        pair = self._models.get(model)
        if pair is None:
            label = model if len(self._models) < MAX_MODEL_LABELS else "other"
            pair = (self.metrics.hits.labels(label), self.metrics.misses.labels(label))
            if label == model:
                self._models[model] = pair
        return pair

    def _encode(self, body: Body) -> bytes | None:
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

    async def _read_many(self, keys: list[str], force: bool = False) -> list[Read]:
        if not force and not self._guard.available():  # circuit open: no future, no round trip
            return [DOWN] * len(keys)
        futs = [self._reads.submit((k, force)) for k in keys]
        return [await f for f in futs]

    async def _write(self, key: str, value: bytes, ttl: int, store: str, force: bool = False
                     ) -> None:
        ok = (force or self._guard.available()) and await self._writes.submit((key, value, ttl, force))
        if ok:
            self.metrics.writes.labels(store).inc()
        else:
            self.metrics.skipped.labels("redis_unavailable").inc()

    async def _mget(self, items: list[tuple[str, bool]]) -> list[Read]:
        keys = [k for k, _ in items]
        unique = list(dict.fromkeys(keys))  # identical requests of one tick: fetch once
        res = await self._guard.call(
            "read", lambda: cast(Awaitable[list[bytes | None]], self._redis.mget(unique)),
            force=any(f for _, f in items),
        )
        if res is DOWN:
            return [DOWN] * len(keys)
        found = dict(zip(unique, res, strict=True))
        return [found[k] for k in keys]

    async def _pipeline_set(self, items: list[tuple[str, bytes, int, bool]]) -> list[bool]:
        async def go() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for key, value, ttl, _ in items:
                pipe.set(key, value, ex=ttl)
            return await pipe.execute(raise_on_error=False)

        res = await self._guard.call("write", go, force=any(i[3] for i in items))
        if res is DOWN:
            return [False] * len(items)
        return self._guard.replies("write", res)
