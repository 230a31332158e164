"""The stream worker: a thin faust agent in front of our own in-flight tracker.

The agent drains its channel's queue a batch at a time (no per-event Stream iteration) and
hands each batch to the processor, which recalls and looks up the whole batch in one Redis
round trip and publishes its hits together; misses continue as one task each. Acks go to
faust only for the contiguous prefix of finished offsets per partition (see ``acks.py``);
records fetched before a rebalance are skipped unacked (faust redelivers them). A semaphore
of ``limits.max_inflight`` slots is taken per record: when it is empty the agent stops
pulling, faust's buffer fills and faust pauses the partitions (backpressure). At most
``BATCHES_AHEAD`` batches are in their Redis round trip and produce at once, so under load
the next batch grows while they are (and nothing waits when idle).

Shutdown (SIGINT/SIGTERM): stop accepting, let in-flight work finish within
``worker.shutdown_grace_seconds``, commit, exit 0; unfinished work is redelivered later.
The whole stop takes at most the grace period plus ``STOP_MARGIN_SECONDS``: what faust and
aiokafka still wait for after our drain (a group coordinator that is gone or moving, a
broker that does not answer) is not waited on past it.

Usage::

    run_worker(load_settings("config/default.yaml"))
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import gc
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import faust
import redis.asyncio as aioredis
from faust.types import TransportT
from prometheus_client import CollectorRegistry

from streams.cache.responses import ResponseCache
from streams.config import Settings
from streams.contract import Source
from streams.dispatch.parts import build_dispatcher
from streams.dispatch.upstream import UpstreamClient
from streams.intake.acks import AckTracker
from streams.intake.processor import InRecord, Processor
from streams.intake.transport import new_transport, unreadable_partitions
from streams.kafka_io import check_kafka, connection_options, ensure_topics, start_producer
from streams.metrics import PipelineMetrics, configured_models, start_http
from streams.output.publisher import KafkaPublisher
from streams.redact import redact_url
from streams.redis_io import check_redis, open_redis, redis_answers

log = logging.getLogger("streams.worker")

BATCH_MAX = 1024  # records taken from faust's queue at once
BATCHES_AHEAD = 2
# The stop gets this long past the grace period: stopping the consumer (STOP_STEP_SECONDS),
# 5 s for cancelled requests to unwind, the final commit (STOP_STEP_SECONDS) and faust's own
# stop (consumer, group leave, services). Past it the worker exits anyway: 0 once our drain
# is done (what is uncommitted is redelivered), else 1 with what is still running logged.
STOP_MARGIN_SECONDS = 12.0
STOP_STEP_SECONDS = 3.0  # stopping the consumer, the final commit: each at most this long


class Runtime:
    """Owns the resources and the in-flight work of one worker process."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry, configured_models(settings))
        self.app: faust.App | None = None
        self._tracker: AckTracker[Any] = AckTracker()
        self._slots = asyncio.Semaphore(settings.limits.max_inflight)
        self._max_tracked = settings.limits.max_tracked
        self._room = asyncio.Event()  # set when the tracker is under max_tracked
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._stopping = False
        self.drained = False  # the stop's own part is done: nothing of ours is left to lose
        self._stack = AsyncExitStack()
        self._processor: Processor | None = None
        self._redis: aioredis.Redis | None = None
        self.redis_ok = False
        self.assigned: int | None = None  # partitions of the last assignment; None: rebalancing
        self._lag_labels: set[tuple[str, str]] = set()
        self._consumed = self.metrics.consumed.labels(settings.topics.requests)
        self._gate = asyncio.Semaphore(BATCHES_AHEAD)

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
        stack.push_async_callback(self._redis.aclose)
        dispatcher = await stack.enter_async_context(
            build_dispatcher(s, UpstreamClient(session), self._redis, self.registry)
        )
        # Always: with cache.enabled false it is the idempotency store alone (no lookups,
        # no coalescing), so a redelivery is still never sent upstream again.
        cache = await stack.enter_async_context(ResponseCache(s, self._redis, self.registry))
        self._processor = Processor(s, publisher, dispatcher, cache, self.metrics)
        if s.metrics.port:
            runner = await start_http(self.registry, s.metrics.host, s.metrics.port, self.ready)
            stack.push_async_callback(runner.cleanup)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self._log_state, loop)
        stack.callback(loop.remove_signal_handler, signal.SIGUSR1)
        stack.enter_context(_Every(self._probe_redis, 1.0, "redis probe"))
        stack.enter_context(_Every(self.update_lag, 5.0, "consumer lag update"))
        self._ready.set()

    async def _probe_redis(self) -> None:
        """Keeps ``redis_ok`` current for /readyz with a cheap PING."""
        self.redis_ok = False
        assert self._redis is not None
        self.redis_ok = await redis_answers(self._redis)

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

    def _log_state(self, loop: asyncio.AbstractEventLoop) -> None:
        log.warning("state: %s; tasks:\n%s", self.state(), "\n".join(_task_lines(loop)))

    def state(self) -> dict[str, Any]:
        """What the worker holds and why it may not be taking more (``kill -USR1 <pid>``)."""
        out: dict[str, Any] = {
            "in_flight_slots_free": self._slots._value,
            "batches_ahead_free": self._gate._value,
            "tasks": len(self._tasks),
            "stopping": self._stopping,
            "assigned": self.assigned,
            "tracked": len(self._tracker),
            "max_tracked": self._max_tracked,
            "tracker": self._tracker.describe(),
        }
        app = self.app
        if app is not None and app._consumer is not None:
            consumer: Any = app.consumer
            out.update(
                generation=app.consumer_generation_id,
                flow_control_active=app.flow_control.is_active(),
                consumer_flow_active=consumer.flow_active,
                suspend_flow=consumer.suspend_flow.is_set(),
                active=sorted(str(tp.partition) for tp in consumer._active_partitions or ()),
                paused=sorted(str(tp.partition) for tp in consumer._paused_partitions),
                buffered=sorted(str(tp.partition) for tp in consumer._buffered_partitions),
                read={tp.partition: off for tp, off in consumer._read_offset.items()},
                committed={tp.partition: off for tp, off in consumer._committed_offset.items()},
                # (queued events, pending pressure-drop callbacks) of the agent's channel
                queue=next((
                    (chan.queue.qsize(), len(chan.queue._pending_pressure_drop_callbacks))
                    for chans in getattr(app.topics, "_tp_index", {}).values() for chan in chans
                ), None),
            )
        return out

    def ready(self) -> bool:
        # An assignment may be empty (more workers than partitions): the member is still ready.
        # A partition held because it cannot be decoded is logged once and makes us unready.
        return (self._ready.is_set() and not self._stopping and self.redis_ok
                and self.assigned is not None and not unreadable_partitions(self.app))

    async def submit_batch(self, events: list[Any]) -> None:
        """Accept faust events and start them, in batches.

        Blocks while every slot is taken or the tracker holds ``limits.max_tracked`` records:
        the agent stops pulling, faust's buffer fills and faust pauses the partitions.
        """
        if not self._ready.is_set():
            await self._ready.wait()
        assert self.app is not None
        app = self.app
        tracker = self._tracker
        batch: list[tuple[Any, InRecord]] = []
        for event in events:
            if self._slots.locked() or len(tracker) >= self._max_tracked:
                await self._start(batch)  # start what we hold before we wait
                batch = []
                await self._wait_for_room()
            await self._slots.acquire()
            msg = event.message
            if self._stopping or _stale(app, msg):
                # Shutdown began (left for redelivery), or the record was fetched before a
                # rebalance: faust seeks to the committed offset and delivers it again. Unlike
                # faust's own stream we do not ack it, so no commit can pass it.
                self._slots.release()
                continue
            tp = msg.tp
            ts = msg.timestamp
            src = Source(msg.topic, msg.partition, msg.offset, int(ts * 1000) if ts else 0)
            rec = InRecord(src, msg.key, msg.value)
            # The tracker keeps the message (what its ack needs), never the record's bytes.
            msg.key = msg.value = None
            # Nothing between add() and the batch can fail: a tracked offset always gets a task.
            if not tracker.add(tp, msg.offset, msg):
                self._slots.release()  # a redelivery of work still in flight: no second task
                self._ack_all(tracker.pending(tp))
                continue
            batch.append((tp, rec))
        await self._start(batch)
        if self._stopping:
            await asyncio.Event().wait()  # take nothing more; the agent is cancelled at stop

    async def _wait_for_room(self) -> None:
        """Until the tracker is under ``limits.max_tracked`` (its records finish by themselves)."""
        while len(self._tracker) >= self._max_tracked:
            self._room.clear()
            await self._room.wait()

    def _ack_all(self, messages: list[Any]) -> None:
        assert self.app is not None
        consumer = self.app.consumer
        for msg in messages:
            msg.ack(consumer)  # what faust's Event.ack() does
        if len(self._tracker) < self._max_tracked:
            self._room.set()

    async def _start(self, batch: list[tuple[Any, InRecord]]) -> None:
        if not batch:
            return
        # At most BATCHES_AHEAD batches in their Redis round trip and produce at once: while
        # they are, the next batch grows in faust's queue (more records per round trip under
        # load, no added wait when idle).
        await self._gate.acquire()
        self._consumed.inc(len(batch))
        self.metrics.in_flight.inc(len(batch))
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Any, InRecord]]) -> None:
        """Process a batch; every record is finished in the tracker unless cancelled."""
        processor = self._processor
        assert processor is not None
        # Unfinished records only: a finished one's value is not kept while a sibling runs.
        open_: dict[int, tuple[Any, InRecord]] = {id(rec): (tp, rec) for tp, rec in batch}
        del batch
        tracker = self._tracker
        gate_held = True

        def fast_done() -> None:
            nonlocal gate_held
            if gate_held:
                gate_held = False
                self._gate.release()

        def done(rec: InRecord, outcome: str) -> None:
            entry = open_.pop(id(rec), None)
            if entry is None:  # finished already
                return
            self._slots.release()
            self.metrics.in_flight.dec()
            self._ack_all(tracker.finish(entry[0], rec.source.offset))

        try:
            try:
                await processor.process_batch([rec for _, rec in open_.values()], done, fast_done)
            except Exception as exc:  # process_batch never raises: if it does, no record stalls
                log.exception("batch failed; dead-lettering its %d unfinished records", len(open_))
                for _, rec in list(open_.values()):
                    done(rec, await processor.fail(rec, exc))
        finally:
            fast_done()
            for _ in open_:  # cancelled at shutdown: not acked, redelivered later
                self._slots.release()
            self.metrics.in_flight.dec(len(open_))

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


def _stale(app: faust.App, msg: Any) -> bool:
    """faust's own test for a record fetched before the current rebalance generation."""
    return bool(msg.generation_id != app.consumer_generation_id
                or not app.flow_control.is_active())


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


def _task_lines(loop: asyncio.AbstractEventLoop) -> list[str]:
    """One line per task of ``loop``: its name and where it waits (for diagnostics)."""
    lines: list[str] = []
    try:
        for task in asyncio.all_tasks(loop):
            frames = task.get_stack(limit=8)
            where = " <- ".join(
                f"{f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"
                for f in reversed(frames)
            )
            lines.append(f"  {task.get_name()}: {where or 'not started'}")
    except Exception as exc:  # diagnostics only
        lines.append(f"  (tasks unavailable: {type(exc).__name__})")
    return sorted(lines)


class _StopWatchdog:
    """A thread that ends a stop that takes too long.

    When ``drained()`` says our own part of the stop is done, what is left waits on Kafka
    (the group coordinator, a flush to a broker that went away): nothing of ours can be lost
    (unacked records are redelivered), so it logs one line and exits 0. Otherwise our own
    stop hangs: it logs every stack and task, then exits 1. A thread, not a loop timer: it
    must fire even if the event loop itself is stuck.
    """

    _armed = False

    @classmethod
    def arm(cls, seconds: float, drained: Callable[[], bool] = lambda: False) -> None:
        if cls._armed:
            return
        cls._armed = True
        loop = asyncio.get_running_loop()
        timer = threading.Timer(seconds, cls._fire, args=(loop, seconds, drained))
        timer.daemon = True
        timer.start()

    @staticmethod
    def _fire(loop: asyncio.AbstractEventLoop, seconds: float, drained: Callable[[], bool]) -> None:
        if drained():
            log.warning("stop: in-flight work drained, but Kafka's side of the stop (group "
                        "leave, coordinator, flush) is still waiting after %.0f s; exiting 0 "
                        "without it (uncommitted records are redelivered)", seconds)
            code = 0
        else:
            log.error("stop did not finish within %.0f s; exiting 1 (unacked records are "
                      "redelivered). Still running:\n%s", seconds, "\n".join(_task_lines(loop)))
            faulthandler.dump_traceback(all_threads=True)
            code = 1
        logging.shutdown()
        os._exit(code)


class StreamsApp(faust.App):
    """faust.App whose stop drains our in-flight work and commits before faust stops."""

    runtime: Runtime

    def _new_transport(self) -> TransportT:
        # faust's transport, minus four tasks per fetched record (streams/faust_io.py)
        return new_transport(self, self.runtime.settings.kafka.isolation_level)

    async def on_start(self) -> None:
        await super().on_start()
        await self.runtime.start()

    async def on_stop(self) -> None:
        runtime = self.runtime
        _StopWatchdog.arm(runtime.settings.worker.shutdown_grace_seconds + STOP_MARGIN_SECONDS,
                          lambda: runtime.drained)
        # Stop taking records first (faust's own first step): a rebalance during our drain
        # skips faust's assignment handling once it is stopping, and a fetcher still running
        # would then crash on a record of a newly assigned partition (KeyError in on_message).
        # Bounded, like every step that may wait on Kafka: we take no new record either way.
        await _within(self._stop_consumer(), STOP_STEP_SECONDS, "stopping the consumer")
        await runtime.drain()
        runtime.drained = True  # what is not committed now is redelivered: nothing else to lose
        await _within(self.consumer.commit(), STOP_STEP_SECONDS, "the final commit")
        await super().on_stop()
        await self.runtime.close()


async def _within(step: Awaitable[Any], seconds: float, what: str) -> None:
    """Await ``step`` for at most ``seconds``, then leave it running and go on (logged).

    Not ``wait_for``: it waits for the cancelled step to unwind, and a step stuck in faust's
    consumer thread on a coordinator that is gone does not.
    """
    task = asyncio.ensure_future(step)
    task.add_done_callback(functools.partial(_log_failure, what))
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        log.warning("%s did not finish within %.0f s (group coordinator away?); going on "
                    "without it (uncommitted records are redelivered)", what, seconds)


def _log_failure(what: str, task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %s", what, type(task.exception()).__name__)


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
        producer_compression_type=s.kafka.codec,
        web_enabled=False,
        stream_processing_timeout=3600,
    )
    app.runtime = runtime
    runtime.app = app
    topic = app.topic(
        s.topics.requests, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )

    async def requests(stream: Any) -> None:
        # The agent drains its channel's queue itself, a batch at a time, instead of
        # iterating the Stream: faust's per-event Stream machinery costs more than our whole
        # cache-hit path (BENCHMARKS.md), and a batch shares one Redis round trip and one
        # produce. We ack ourselves (as with noack()), through the tracker, in offset order.
        queue = stream.channel.queue
        while True:
            try:
                events = [await queue.get()]
            except StopAsyncIteration:  # faust ends the stream at shutdown
                return
            while len(events) < BATCH_MAX:
                try:
                    events.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await runtime.submit_batch(events)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the agent die: unacked records are redelivered
                log.exception("could not accept %d records", len(events))

    app.agent(topic, name="llm-requests")(requests)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, revoked: set[Any], **_: Any) -> None:
        runtime.on_revoked(revoked)
        runtime.assigned = None

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any, assigned: set[Any], **_: Any) -> None:
        # faust's own topics (its leader topic) are assigned too: count only ours
        mine = sum(1 for tp in assigned if tp.topic == s.topics.requests)
        runtime.assigned = mine
        runtime.metrics.assigned_partitions.set(mine)

    return app


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop when configured and installed (a fraction of asyncio's cost per event)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # an optional speed-up: run on asyncio's loop without it
            log.warning("worker.event_loop is uvloop but uvloop is not installed; using asyncio")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def prepare(settings: Settings) -> None:
    """Stop at once on what no retry can fix (credentials); create the topics.

    Raises ``StartupError``. Redis may be away at start: the worker runs without it.
    """
    await check_kafka(settings)
    client = open_redis(settings)
    try:
        await check_redis(client, settings)
    finally:
        await client.aclose()
    await ensure_topics(settings)
    k = settings.kafka
    auth = f", {k.mechanism} as {k.sasl_username}" if k.security_protocol.startswith("SASL") else ""
    log.info("starting: kafka %s (%s%s), redis %s, endpoints %s", k.bootstrap_servers,
             k.security_protocol, auth, redact_url(settings.redis.url.get_secret_value()),
             ", ".join(e.name for e in settings.endpoints))


def run_worker(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; return the exit code. Raises ``StartupError``."""
    if settings.worker.gc_threshold:
        # Fewer cyclic-GC passes with thousands of requests in flight (see BENCHMARKS.md).
        gc.set_threshold(settings.worker.gc_threshold, 50, 100)
    asyncio.run(prepare(settings))
    loop = _new_loop(settings.worker.event_loop)
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
