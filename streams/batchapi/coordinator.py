"""The batch coordinator: the parked partitions this worker owns, through a consumer group.

Every worker with ``batch_api`` enabled runs one; the group ``<kafka.group_id>.batch`` gives
each parked partition to exactly one of them. For each partition it reads the parked
requests (``partition.PartitionJobs``), runs their cuts (``runner.CutRunner``), sends
requests that cannot wait (or whose job failed) down the normal path (the processor without
parking), and commits each partition up to its first unsettled offset. When a partition
moves (a rebalance, a worker killed), its new owner loads the cuts from the job store and
resumes them; what was not committed is read again.

Usage::

    async with Coordinator(settings, store, runner, plain_processor, metrics):
        ...   # runs until the worker stops
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from streams.batchapi.jobs import JobStore
from streams.batchapi.metrics import JOB_STATES, BatchMetrics
from streams.batchapi.parking import ParkedRecord, read_source
from streams.batchapi.partition import ActiveCut, Held, PartitionJobs
from streams.batchapi.runner import CutRunner
from streams.config import Settings
from streams.contract import Request, Source, parse_request
from streams.errors import ValidationFailed
from streams.intake.processor import InRecord, Processor
from streams.kafka_io import consumer_options, topic_partitions

log = logging.getLogger("streams.batchapi")


class Coordinator:
    """See the module docstring."""

    def __init__(self, settings: Settings, store: JobStore, runner: CutRunner,
                 plain: Processor, metrics: BatchMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._cfg = settings.batch_api
        self._topic = settings.topics.parked_topic
        self._store = store
        self._runner = runner
        self._plain = plain
        self._metrics = metrics
        self._clock = clock
        self._parts: dict[int, PartitionJobs] = {}
        self._tasks: dict[int, set[asyncio.Task[None]]] = {}
        self._committed: dict[int, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._next_commit = 0.0

    async def __aenter__(self) -> Coordinator:
        consumer = AIOKafkaConsumer(
            group_id=f"{self._settings.kafka.group_id}.batch", enable_auto_commit=False,
            auto_offset_reset="earliest", client_id=f"{self._settings.kafka.client_id}-batch",
            session_timeout_ms=int(self._settings.kafka.session_timeout_seconds * 1000),
            **consumer_options(self._settings))
        await consumer.start()
        for _ in range(100):  # a topic just created: the group assigns only what metadata shows
            if await topic_partitions(self._settings, self._topic):
                break
            await asyncio.sleep(0.1)
        consumer.subscribe([self._topic], listener=_Listener(self))
        self._consumer = consumer
        self._loop_task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for partition in list(self._parts):
            await self._release(partition)
        if self._consumer is not None:
            await self._consumer.stop()

    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broker away, a bug: logged, tried again
                log.exception("batch coordinator step failed")
                await asyncio.sleep(1.0)

    async def _step(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        got = await consumer.getmany(timeout_ms=500, max_records=10_000)
        for tp, msgs in got.items():
            pj = self._parts.get(tp.partition)
            if pj is not None:
                for m in msgs:
                    pj.feed(self._held(tp.partition, m))
            elif msgs and tp in consumer.assignment():  # fetched before its cuts were loaded
                consumer.seek(tp, msgs[0].offset)
        for partition, pj in list(self._parts.items()):  # a rebalance may change it meanwhile
            tp = TopicPartition(self._topic, partition)
            if tp in consumer.assignment():
                pj.position = max(pj.position, await consumer.position(tp))
        now = self._clock()
        for pj in list(self._parts.values()):
            pj.tick(now)
        if now >= self._next_commit:
            self._next_commit = now + self._settings.kafka.commit_interval_seconds
            await self._commit()
        self._flow()
        self._gauges(now)

    def _held(self, partition: int, m: Any) -> Held:
        ts = int(m.timestamp or 0)
        source = read_source(m.headers) or Source(self._topic, partition, m.offset, ts)
        rec = ParkedRecord(source, m.key, m.value, m.offset, ts / 1000.0)
        req: Request | None
        try:
            req = parse_request(m.value, max_bytes=self._settings.limits.max_value_bytes,
                                default_model=self._settings.worker.default_model,
                                max_ttl=self._settings.cache.max_ttl_seconds)
        except ValidationFailed:
            req = None  # the normal path writes its dead letter
        return Held(rec, req)

    async def _commit(self, only: int | None = None) -> None:
        consumer = self._consumer
        assert consumer is not None
        offsets = {}
        for partition, pj in list(self._parts.items()):
            if only is not None and partition != only:
                continue
            offset = pj.commit_offset()
            if offset is not None and offset > self._committed.get(partition, -1):
                offsets[TopicPartition(self._topic, partition)] = offset
        if offsets:
            try:
                await consumer.commit(offsets)
            except KafkaError as exc:  # a rebalance under way: the next owner reads it again
                log.warning("commit of parked offsets failed (%s)", type(exc).__name__)
                return
            for tp, offset in offsets.items():
                self._committed[tp.partition] = offset
        for partition, pj in list(self._parts.items()):
            for cut in pj.finished_cuts(self._committed.get(partition, -1)):
                await self._store.drop(cut)

    def _flow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        limit = 2 * self._cfg.max_requests_per_job
        assigned = consumer.assignment()
        for partition, pj in self._parts.items():
            tp = TopicPartition(self._topic, partition)
            if tp not in assigned:
                continue
            if pj.held_count() >= limit:
                consumer.pause(tp)
            elif tp in consumer.paused():
                consumer.resume(tp)

    def _gauges(self, now: float) -> None:
        counts = dict.fromkeys(JOB_STATES, 0)
        oldest = now
        for pj in self._parts.values():
            for part, created in pj.parts():
                counts[part.state] = counts.get(part.state, 0) + 1
                oldest = min(oldest, created)
        for state, n in counts.items():
            self._metrics.jobs.labels(state).set(n)
        self._metrics.job_age.set(now - oldest)

    def _start_cut(self, pj: PartitionJobs, active: ActiveCut) -> asyncio.Task[None]:
        return self._track(pj.partition, self._run_cut(pj, active))

    async def _run_cut(self, pj: PartitionJobs, active: ActiveCut) -> None:
        while True:
            try:
                await self._runner.run(pj, active)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # the job store away, a bug: the cut is resumed from its state
                log.exception("batch cut %s failed; resuming", active.cut.key)
                await asyncio.sleep(self._cfg.poll_seconds)

    def _normal(self, pj: PartitionJobs, helds: list[Held], reason: str) -> None:
        """Answer ``helds`` by normal calls (the processor without parking), then settle them."""
        self._metrics.fallbacks.labels(reason).inc(len(helds))
        log.info("%d parked request(s) of partition %d take the normal path (%s)", len(helds),
                 pj.partition, reason)
        recs = [InRecord(h.rec.source, h.rec.key, h.rec.value) for h in helds]
        offsets = {id(r): h.rec.offset for r, h in zip(recs, helds, strict=True)}

        def done(rec: InRecord, outcome: str) -> None:
            pj.settle(offsets[id(rec)])

        self._track(pj.partition, self._plain.process_batch(recs, done))

    def _track(self, partition: int, work: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        tasks = self._tasks.setdefault(partition, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    async def assigned(self, partitions: list[int]) -> None:
        stored = await self._store.load()
        for partition in partitions:
            if partition in self._parts:
                continue
            cuts = [c for c in stored.values() if c.partition == partition]
            self._parts[partition] = PartitionJobs(
                partition, cuts, self._start_cut, self._normal,
                self._cfg.max_requests_per_job, self._cfg.max_wait_seconds,
                self._cfg.fallback_slack_seconds)
            self._committed.pop(partition, None)
            if cuts:
                log.info("parked partition %d: resuming %d batch cut(s)", partition, len(cuts))

    async def _release(self, partition: int) -> None:
        """Give the partition up: commit what is settled, stop its work (redelivered)."""
        try:
            await self._commit(only=partition)
        except Exception as exc:  # the group moved on: the next owner reads it again
            log.warning("commit of parked partition %d at release failed: %s", partition, exc)
        tasks = self._tasks.pop(partition, set())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._parts.pop(partition, None)
        self._committed.pop(partition, None)

    async def revoked(self, partitions: list[int]) -> None:
        for partition in partitions:
            if partition in self._parts:
                await self._release(partition)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._c.revoked([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._c.assigned([tp.partition for tp in assigned])
