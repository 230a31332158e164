"""The worker's runtime: its resources and the path of each record from the agent to the ack.

The agent hands each batch to ``submit_batch``; the processor recalls and looks up the whole
batch in one Redis round trip and publishes its hits together; misses continue as one task
each. Acks go to faust only for the contiguous prefix of finished offsets per partition
(``acks.py``); records fetched before a rebalance are skipped unacked (faust redelivers
them). A semaphore of ``limits.max_inflight + limits.max_queued`` slots is taken per record
(calls in flight are capped at ``max_inflight`` by the dispatcher; the rest is read-ahead, so
priority and fair share act on what is queued in Kafka): when it is empty
the agent stops pulling, faust's buffer fills and faust pauses the partitions
(backpressure). At most ``BATCHES_AHEAD`` batches are in their Redis round trip and produce
at once, so under load the next batch grows while they are (and nothing waits when idle).

Usage::

    runtime = Runtime(settings)
    app = build_app(settings, runtime)   # agent.py: runtime.start() runs in the app's on_start
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import faust
from prometheus_client import CollectorRegistry

from streams.batchapi.wiring import batch_parts
from streams.cache.responses import ResponseCache
from streams.config import Settings
from streams.contract import Source
from streams.dispatch.parts import build_dispatcher
from streams.dispatch.upstream import UpstreamClient
from streams.intake.acks import AckTracker
from streams.intake.finished import Ledger
from streams.intake.front import Front
from streams.intake.processor import InRecord, Processor, cancelling
from streams.intake.slots import Slots
from streams.intake.stopping import task_lines
from streams.intake.transport import committed_offsets, consumer_state, is_stale, unreadable_partitions
from streams.kafka_io import start_producer
from streams.metrics import PipelineMetrics, configured_models, start_http
from streams.output.publisher import KafkaPublisher
from streams.redis_io import RedisClient, open_redis, redis_answers

log = logging.getLogger("streams.worker")

BATCHES_AHEAD = 2


class Runtime:
    """Owns the resources and the in-flight work of one worker process."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None,
                 front: Front | None = None) -> None:
        self.settings = settings
        self._front = front  # a pipeline's front stage; None: the requests topic
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry, configured_models(settings), settings.tenants)
        self.app: faust.App | None = None
        self._tracker: AckTracker[Any] = AckTracker()
        # the offsets finished above each commit, written into it and read back at assignment
        self.finished = Ledger(self._tracker, settings.kafka.commit_metadata_max_bytes)
        # Read-ahead: a record holds a slot from intake to its ack, but only calls in flight
        # count against max_inflight (the dispatcher's admission): records waiting for a rate
        # limit, a budget or their fair share take the max_queued slots on top.
        self._slots = Slots(settings.limits.max_inflight + settings.limits.max_queued)
        self._max_tracked = settings.limits.max_tracked
        self._room = asyncio.Event()  # set when the tracker is under max_tracked
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._stopping = False
        self.drained = False  # the stop's own part is done: nothing of ours is left to lose
        self._stack = AsyncExitStack()
        self._processor: Processor | None = None
        self._redis: RedisClient | None = None
        self.redis_ok = False
        self.assigned: int | None = None  # partitions of the last assignment; None: rebalancing
        self._lag_labels: set[tuple[str, str]] = set()
        self._consumed = self.metrics.consumed.labels(settings.topics.requests)
        self._skipped = self.metrics.skipped_finished.labels(settings.topics.requests)
        self._gate = Slots(BATCHES_AHEAD)

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
        parking = await stack.enter_async_context(batch_parts(  # work that can wait (batchapi)
            s, publisher, dispatcher, cache, self.metrics, self.registry, session))
        self._processor = Processor(s, publisher, dispatcher, cache, self.metrics,
                                    front=self._front, parking=parking)
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
            committed = committed_offsets(consumer)
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
        log.warning("state: %s; tasks:\n%s", self.state(), "\n".join(task_lines(loop)))

    def state(self) -> dict[str, Any]:
        """What the worker holds and why it may not be taking more (``kill -USR1 <pid>``)."""
        out: dict[str, Any] = {
            "in_flight_slots_free": self._slots.free,
            "batches_ahead_free": self._gate.free,
            "tasks": len(self._tasks),
            "stopping": self._stopping,
            "assigned": self.assigned,
            "tracked": len(self._tracker),
            "max_tracked": self._max_tracked,
            "tracker": self._tracker.describe(),
        }
        out.update(consumer_state(self.app))
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
            if self._stopping or is_stale(app, msg):
                # Shutdown began (left for redelivery), or the record was fetched before a
                # rebalance: faust seeks to the committed offset and delivers it again. Unlike
                # faust's own stream we do not ack it, so no commit can pass it.
                self._slots.release()
                continue
            tp = msg.tp
            if self.finished.skips(tp, msg.offset):
                # published before a crash or rebalance (the commit's metadata says so)
                self._slots.release()
                self._skip_finished(tp, msg)
                continue
            ts = msg.timestamp
            src = Source(msg.topic, msg.partition, msg.offset, int(ts * 1000) if ts else 0)
            rec = InRecord(src, msg.key, msg.value, msg.headers)
            # The tracker keeps the message (what its ack needs), never the record's bytes.
            msg.key = msg.value = msg.headers = None
            # Nothing between add() and the batch can fail: a tracked offset always gets a task.
            if not tracker.add(tp, msg.offset, msg):
                self._slots.release()  # a redelivery of work still in flight: no second task
                self._ack_all(tracker.pending(tp))
                continue
            batch.append((tp, rec))
        await self._start(batch)
        if self._stopping:
            await asyncio.Event().wait()  # take nothing more; the agent is cancelled at stop

    def _skip_finished(self, tp: Any, msg: Any) -> None:
        """Finish a record whose output an earlier owner published: acked in offset order."""
        msg.key = msg.value = None
        self._skipped.inc()
        if self._tracker.add(tp, msg.offset, msg):
            self._ack_all(self._tracker.finish(tp, msg.offset))
        else:  # still in flight here from before the rebalance: it finishes by itself
            self._ack_all(self._tracker.pending(tp))

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
            except (Exception, asyncio.CancelledError) as exc:
                # process_batch never raises but on a stop: if it does, no record stalls (a
                # tracked offset without a task would hold its partition's commits for good,
                # and a redelivery would bind to it instead of starting it again)
                if isinstance(exc, asyncio.CancelledError) and cancelling():
                    raise  # a stop: unfinished records are redelivered
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
