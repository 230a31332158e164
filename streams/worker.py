"""The stream worker: a thin faust agent in front of our own in-flight tracker.

The agent takes events with ``noack()``, hands each to a task, and acks to faust only the
contiguous prefix of finished offsets per partition (see ``acks.py``). A semaphore of
``limits.max_inflight`` slots is taken before each event is accepted: when it is empty the
agent stops pulling, faust's buffer fills and faust pauses the partitions (backpressure).

Shutdown (SIGINT/SIGTERM): stop accepting, let in-flight work finish within
``worker.shutdown_grace_seconds``, commit, exit 0; unfinished work is redelivered later.

Usage::

    run_worker(load_settings("config/default.yaml"))
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import faust
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from streams.acks import AckTracker
from streams.cache import ResponseCache
from streams.config import Settings
from streams.contract import Source
from streams.dispatcher import Dispatcher
from streams.kafka_io import KafkaPublisher, connection_options, ensure_topics, start_producer
from streams.metrics import PipelineMetrics, start_http
from streams.processor import InRecord, Processor
from streams.upstream import UpstreamClient

log = logging.getLogger("streams.worker")


class Runtime:
    """Owns the resources and the in-flight work of one worker process."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.app: faust.App | None = None
        self._tracker: AckTracker[Any] = AckTracker()
        self._slots = asyncio.Semaphore(settings.limits.max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._stopping = False
        self._stack = AsyncExitStack()
        self._processor: Processor | None = None
        self._redis: aioredis.Redis | None = None
        self.redis_ok = False
        self.assigned: int | None = None  # partitions of the last assignment; None: rebalancing
        self._lag_labels: set[tuple[str, str]] = set()

    async def start(self) -> None:
        s = self.settings
        stack = self._stack
        publisher = await stack.enter_async_context(
            KafkaPublisher(lambda: start_producer(s), self.metrics)
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        )
        self._redis = open_redis(s)
        stack.push_async_callback(self._redis.connection_pool.aclose)
        stack.push_async_callback(self._redis.aclose)
        dispatcher = await stack.enter_async_context(
            Dispatcher(s, UpstreamClient(session), self._redis, self.registry)
        )
        cache = None
        if s.cache.enabled:
            cache = await stack.enter_async_context(ResponseCache(s, self._redis, self.registry))
        self._processor = Processor(s, publisher, dispatcher, cache, self.metrics)
        if s.metrics.port:
            runner = await start_http(self.registry, s.metrics.host, s.metrics.port, self.ready)
            stack.push_async_callback(runner.cleanup)
        stack.enter_context(_Every(self._probe_redis, 1.0, "redis probe"))
        stack.enter_context(_Every(self.update_lag, 5.0, "consumer lag update"))
        self._ready.set()

    async def _probe_redis(self) -> None:
        """Keeps ``redis_ok`` current for /readyz with a cheap PING."""
        self.redis_ok = False
        assert self._redis is not None
        self.redis_ok = bool(await self._redis.ping())

    async def update_lag(self) -> None:
        """Set llm_streams_consumer_lag per assigned partition: end offset minus committed.

        A partition with no commit yet counts from its earliest offset (the group starts
        there: ``auto_offset_reset=earliest``). Partitions no longer assigned are dropped.
        """
        if self.app is None:
            return
        consumer = self.app.consumer
        topic = self.settings.topics.requests
        tps = sorted(tp for tp in consumer.assignment() if tp.topic == topic)
        lags: dict[tuple[str, str], int] = {}
        if tps:
            ends = await consumer.highwaters(*tps)
            # faust's own record of what it committed (next offset to read), per partition
            committed: dict[Any, int | None] = dict(getattr(consumer, "_committed_offset", {}))
            unknown = [tp for tp in tps if committed.get(tp) is None]
            starts = await consumer.earliest_offsets(*unknown) if unknown else {}
            for tp in tps:
                end = ends.get(tp)
                base = committed.get(tp)
                if base is None:
                    base = starts.get(tp)
                if end is not None and base is not None:
                    lags[(tp.topic, str(tp.partition))] = max(0, end - base)
        gauge = self.metrics.consumer_lag
        for labels in self._lag_labels - lags.keys():
            gauge.remove(*labels)
        for labels, lag in lags.items():
            gauge.labels(*labels).set(lag)
        self._lag_labels = set(lags)

    def ready(self) -> bool:
        # An assignment may be empty (more workers than partitions): the member is still ready.
        return (self._ready.is_set() and not self._stopping and self.redis_ok
                and self.assigned is not None)

    async def submit(self, event: Any) -> None:
        """Accept one faust event (blocks while every in-flight slot is taken)."""
        if not self._ready.is_set():
            await self._ready.wait()
        if self._stopping:
            await asyncio.Event().wait()  # take nothing more; the agent is cancelled at stop
        await self._slots.acquire()
        if self._stopping:  # shutdown began while we waited for a slot: leave it for redelivery
            self._slots.release()
            await asyncio.Event().wait()
        msg = event.message
        tp = msg.tp
        if not self._tracker.add(tp, msg.offset, event):
            self._slots.release()  # a redelivery of work still in flight: no second task
            _ack_all(self._tracker.pending(tp))
            return
        self.metrics.consumed.labels(msg.topic).inc()
        self.metrics.in_flight.inc()
        ts = msg.timestamp
        rec = InRecord(
            Source(msg.topic, msg.partition, msg.offset, int(ts * 1000) if ts else 0),
            msg.key,
            msg.value,
        )
        task = asyncio.create_task(self._run(tp, msg.offset, rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, tp: Any, offset: int, rec: InRecord) -> None:
        assert self._processor is not None
        try:
            await self._processor.process(rec)
        finally:
            self._slots.release()
            self.metrics.in_flight.dec()
        _ack_all(self._tracker.finish(tp, offset))

    def on_revoked(self, revoked: set[Any]) -> None:
        self._tracker.revoke(revoked)

    async def drain(self) -> None:
        """Stop accepting; give in-flight work the grace period, then cancel the rest."""
        self._stopping = True
        grace = self.settings.worker.shutdown_grace_seconds
        if self._tasks:
            log.info("draining %d in-flight requests (grace %.0f s)", len(self._tasks), grace)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d requests unfinished at shutdown; they will be redelivered",
                            len(pending))
                await asyncio.wait(pending, timeout=5)

    async def close(self) -> None:
        await self._stack.aclose()


def open_redis(settings: Settings) -> aioredis.Redis:
    """The worker's Redis client; close it, then its ``connection_pool``.

    Thousands of requests in flight share a bounded pool: a burst waits for a free
    connection (up to the socket timeout) instead of failing with "Too many connections"
    (redis-py's default pool stops at 100), which would bypass the cache and the
    idempotency store and so let a redelivered answered id call the upstream again.
    """
    r = settings.redis
    pool = aioredis.BlockingConnectionPool.from_url(
        r.url.get_secret_value(),
        password=r.password.get_secret_value() if r.password else None,
        max_connections=r.max_connections,
        timeout=r.socket_timeout_seconds,
        socket_timeout=r.socket_timeout_seconds,
        socket_connect_timeout=r.socket_timeout_seconds,
        # A connection left stale by a Redis restart is retried once at once, so the
        # first command after an outage does not count as one more failure.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        health_check_interval=10,
    )
    return aioredis.Redis(connection_pool=pool)


def _ack_all(events: list[Any]) -> None:
    for event in events:
        event.ack()


class _Every:
    """Runs ``job`` every ``interval`` seconds until closed; a failing run never stops it."""

    def __init__(self, job: Callable[[], Awaitable[None]], interval: float, what: str) -> None:
        self._job = job
        self._interval = interval
        self._what = what
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> _Every:
        self._task = asyncio.create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._job(), timeout=self._interval * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not started yet, rebalancing, a server away: next time
                log.debug("%s failed: %s: %s", self._what, type(exc).__name__, exc)
            await asyncio.sleep(self._interval)


class StreamsApp(faust.App):
    """faust.App whose stop drains our in-flight work and commits before faust stops."""

    runtime: Runtime

    async def on_start(self) -> None:
        await super().on_start()
        await self.runtime.start()

    async def on_stop(self) -> None:
        # Stop taking records first (faust's own first step): a rebalance during our drain
        # skips faust's assignment handling once it is stopping, and a fetcher still running
        # would then crash on a record of a newly assigned partition (KeyError in on_message).
        await self._stop_consumer()
        await self.runtime.drain()
        try:
            await self.consumer.commit()
        except Exception as exc:  # commit is best effort here: uncommitted work is redelivered
            log.warning("final commit failed: %s", type(exc).__name__)
        await super().on_stop()
        await self.runtime.close()


def build_app(settings: Settings, runtime: Runtime) -> StreamsApp:
    s = settings
    credentials: faust.SASLCredentials | faust.SSLCredentials | None = None
    if s.kafka.security_protocol != "PLAINTEXT":
        opts = connection_options(s)
        if s.kafka.security_protocol.startswith("SASL"):
            credentials = faust.SASLCredentials(
                username=opts["sasl_plain_username"],
                password=opts["sasl_plain_password"],
                mechanism=opts["sasl_mechanism"],
                ssl_context=opts.get("ssl_context"),
            )
        else:
            credentials = faust.SSLCredentials(opts["ssl_context"])
    app = StreamsApp(
        s.kafka.group_id,
        broker=[f"kafka://{b}" for b in s.kafka.bootstrap_servers.split(",")],
        broker_credentials=credentials,
        datadir=os.path.join(tempfile.gettempdir(), f"llm-streams-{s.kafka.group_id}"),
        topic_partitions=s.kafka.partitions,
        topic_replication_factor=s.kafka.replication_factor,
        stream_wait_empty=False,  # we drain ourselves; faust's wait would hold rebalances hostage
        broker_commit_interval=s.kafka.commit_interval_seconds,
        broker_session_timeout=s.kafka.session_timeout_seconds,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=min(4096, max(256, s.limits.max_inflight)),
        producer_acks=-1,
        web_enabled=False,
        stream_processing_timeout=3600,
    )
    app.runtime = runtime
    runtime.app = app
    topic = app.topic(
        s.topics.requests, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )

    async def requests(stream: Any) -> None:  # faust.Stream: noack() is not in StreamT
        async for event in stream.noack().events():
            try:
                await runtime.submit(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let an event escape the agent (faust would skip it)
                log.exception("could not accept record at offset %s", event.message.offset)

    app.agent(topic, name="llm-requests")(requests)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, revoked: set[Any], **_: Any) -> None:
        runtime.on_revoked(revoked)
        runtime.assigned = None

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any, assigned: set[Any], **_: Any) -> None:
        runtime.assigned = len(assigned)
        runtime.metrics.assigned_partitions.set(len(assigned))

    return app


def run_worker(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; return the exit code."""
    if settings.worker.gc_threshold:
        # Fewer cyclic-GC passes with thousands of requests in flight (see BENCHMARKS.md).
        gc.set_threshold(settings.worker.gc_threshold, 50, 100)
    asyncio.run(ensure_topics(settings))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    runtime = Runtime(settings)
    app = build_app(settings, runtime)
    worker = faust.Worker(
        app, loop=loop, loglevel=settings.worker.log_level.lower(), quiet=True,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
