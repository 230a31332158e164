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
Its resources are opened by ``resources.py``; Redis and the consumer lag are probed by
``probes.py``, and the event loop's stalls watched by ``stalls.py``.

Usage::

    runtime = Runtime(settings)
    app = build_app(settings, runtime)   # agent.py: runtime.start() runs in the app's on_start
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack
from typing import Any

import faust
from prometheus_client import CollectorRegistry

from streams.config import Settings
from streams.contract import Source
from streams.intake.acks import AckTracker
from streams.intake.front import Front
from streams.intake.ledger import Ledger
from streams.intake.marks import PublishedMarks
from streams.intake.owner import HANDED_OVER, Ownership
from streams.intake.probes import Probes
from streams.intake.processor import InRecord, Processor, cancelling
from streams.intake.resources import open_resources
from streams.intake.slots import Slots
from streams.intake.stalls import LoopWatch
from streams.intake.stopping import task_lines
from streams.intake.transport import consumer_state, is_stale
from streams.intake.unreadable import unreadable_partitions
from streams.metrics import PipelineMetrics, configured_models

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
        self._probes = Probes(settings.topics.requests, self.metrics)
        self.assigned: int | None = None  # partitions of the last assignment; None: rebalancing
        self._consumed = self.metrics.consumed.labels(settings.topics.requests)
        self._skipped = self.metrics.skipped_finished.labels(settings.topics.requests)
        self._gate = Slots(BATCHES_AHEAD)
        # an answer whose partition went to another worker is left to it (owner.py); a
        # rebalance that takes longer than this is not waited out
        self.owner = Ownership(2 * settings.kafka.session_timeout_seconds)

    async def start(self) -> None:
        stack = self._stack
        self._processor, redis = await open_resources(
            stack, self.settings, self.registry, self.metrics, self._front, self.ready,
            self.owner)
        # published offsets are marked in Redis at once, for the next owner (marks.py)
        self.finished.marks = PublishedMarks(redis, self.settings.redis.key_prefix)
        stack.push_async_callback(self.finished.marks.close)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self._log_state, loop)
        stack.callback(loop.remove_signal_handler, signal.SIGUSR1)
        stack.enter_context(self._probes.running(redis, lambda: self.app))
        stack.enter_context(LoopWatch(self.metrics))
        self._ready.set()

    @property
    def redis_ok(self) -> bool:
        """Redis answered the last probe (one condition of ``ready``)."""
        return self._probes.redis_ok

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
            if outcome == HANDED_OVER:  # its new owner publishes it: a redelivery here redoes it
                self._ack_all(tracker.forget(entry[0], rec.source.offset))
            else:
                self.finished.published(entry[0], rec.source.offset)
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
        self.owner.revoked()

    def on_assigned(self, assigned: set[Any]) -> None:
        self.owner.assigned((tp.topic, tp.partition) for tp in assigned)

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
