"""Job state in Kafka: one record per cut of a parked partition, in a compacted topic.

A cut is the run of parked offsets ``[start, end)`` whose requests went into jobs together;
it holds one part per endpoint and model, each a provider batch (its input file id, batch id,
when it was submitted). The coordinator writes the cut before it uploads anything, again
after each step (file uploaded, batch created), marks it done once every answer is
published, and writes a tombstone once the parked offsets are committed past it. Redis may
evict or lose keys; this topic does not, so a coordinator that replaces a killed one resumes
polling the same batches (nothing is submitted twice for the same requests).

Usage::

    store = JobStore(settings, producer)
    cuts = await store.load()            # key -> Cut, the latest state of each
    await store.save(cut); await store.drop(cut)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.config import Settings
from streams.kafka_io import connection_options, consumer_options, topic_partitions

log = logging.getLogger("streams.batchapi")


@dataclass(slots=True)
class Part:
    """One provider batch: the requests of a cut for one endpoint and model."""

    endpoint: str
    model: str
    lines: int = 0
    file_id: str | None = None
    batch_id: str | None = None
    submitted_at: str | None = None  # ISO 8601 UTC, when the batch was created
    state: str = "building"  # building, submitted, completed, failed

    @property
    def tag(self) -> str:
        return f"{self.endpoint}/{self.model}"


@dataclass(slots=True)
class Cut:
    """The parked offsets [start, end) of one partition and the batches answering them."""

    partition: int
    start: int
    end: int
    count: int  # parked records in the range
    created: float = field(default_factory=time.time)  # epoch seconds
    parts: list[Part] = field(default_factory=list)
    done: bool = False

    @property
    def key(self) -> str:
        return f"{self.partition}:{self.start}"

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))


PART_STATES = ("building", "submitted", "completed", "failed")


def decode_cut(raw: bytes) -> Cut | None:
    """A cut from its record, or None when it is not one of ours (logged). Never raises."""
    try:
        doc: Any = orjson.loads(raw)
        parts = [Part(**p) for p in doc.pop("parts")]
        cut = Cut(**doc, parts=parts)
        _check(cut)
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError, ValueError) as exc:
        log.error("unreadable batch job record skipped: %s", exc)
        return None
    return cut


def _check(cut: Cut) -> None:
    if not all(type(v) is int and v >= 0 for v in (cut.partition, cut.start, cut.end, cut.count)):
        raise TypeError("partition, start, end and count must be integers >= 0")
    if cut.end < cut.start or type(cut.done) is not bool:
        raise ValueError("end before start, or done not a bool")
    if type(cut.created) not in (int, float) or cut.created != cut.created:
        raise TypeError("created must be a number")
    for p in cut.parts:
        if not (isinstance(p.endpoint, str) and isinstance(p.model, str)
                and type(p.lines) is int and p.state in PART_STATES
                and all(v is None or isinstance(v, str)
                        for v in (p.file_id, p.batch_id, p.submitted_at))):
            raise TypeError("a part of unexpected types")


class JobStore:
    """Reads and writes cuts in ``topics.batch_jobs`` (keyed by partition and start)."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self._settings = settings
        self._topic = settings.topics.batch_jobs_topic
        self._producer = producer

    async def load(self) -> dict[str, Cut]:
        """The latest state of every cut not yet dropped: the topic read to its end."""
        consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                                    **consumer_options(self._settings))
        await consumer.start()
        try:
            tps = await topic_partitions(self._settings, self._topic)
            if not tps:
                return {}
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            cuts: dict[str, Cut] = {}
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                got = await consumer.getmany(timeout_ms=500)
                for msgs in got.values():
                    for m in msgs:
                        key = (m.key or b"").decode("utf-8", "replace")
                        cut = decode_cut(m.value) if m.value is not None else None
                        if cut is None:
                            cuts.pop(key, None)
                        else:
                            cuts[key] = cut
            return cuts
        finally:
            await consumer.stop()

    async def save(self, cut: Cut) -> None:
        """Write the cut's state; returns once the broker has it (acks=all)."""
        await self._producer.send_and_wait(self._topic, cut.encode(), key=cut.key.encode())

    async def drop(self, cut: Cut) -> None:
        await self._producer.send_and_wait(self._topic, None, key=cut.key.encode())


async def ensure_batch_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create the parked topic (``kafka.partitions``) and the compacted jobs topic if missing."""
    admin = AIOKafkaAdminClient(
        client_id=f"{settings.kafka.client_id}-admin", request_timeout_ms=int(timeout * 1000),
        **connection_options(settings),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        k, t = settings.kafka, settings.topics
        new = []
        if t.parked_topic not in existing:
            new.append(NewTopic(t.parked_topic, k.partitions, k.replication_factor))
        if t.batch_jobs_topic not in existing:
            new.append(NewTopic(t.batch_jobs_topic, 1, k.replication_factor,
                                topic_configs={"cleanup.policy": "compact"}))
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:  # another worker won the race
                pass
    finally:
        await admin.close()


