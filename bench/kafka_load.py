"""Kafka side of the benchmark: unique topics, a bulk or paced producer, output counting.

Outputs are counted from the topics' end offsets (cheap: the collector must not compete with
the worker for the two cores while it runs) and read in full only once the run is over.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.procs import KAFKA

PARTITIONS = 4


@dataclass
class Topics:
    name: str

    @classmethod
    def unique(cls, scenario: str) -> Topics:
        return cls(f"bench-{scenario}-{uuid.uuid4().hex[:8]}")

    @property
    def requests(self) -> str:
        return f"{self.name}.requests"

    @property
    def responses(self) -> str:
        return f"{self.name}.responses"

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"

    def all(self) -> list[str]:
        return [self.requests, self.responses, self.dlq]


async def create_topics(topics: Topics) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics.all()])
    finally:
        await admin.close()


async def delete_topics(topics: Topics) -> None:
    """Best effort: the broker is shared, so leave nothing behind."""
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    try:
        await admin.start()
        await admin.delete_topics(topics.all())
    except Exception:  # cleanup must never fail a benchmark run
        pass
    finally:
        await admin.close()


def requests(n: int, prefix: str, prompt: Any = None, priority: Any = None) -> list[bytes]:
    """n encoded request records; prompt(i) / priority(i) pick the prompt and priority."""
    out = []
    for i in range(n):
        doc: dict[str, Any] = {"id": f"{prefix}-{i}",
                               "input": prompt(i) if prompt else f"{prefix} unique prompt {i}"}
        if priority is not None:
            doc["priority"] = priority(i)
            doc["metadata"] = {"priority": doc["priority"]}
        out.append(orjson.dumps(doc))
    return out


async def produce(topic: str, values: Sequence[bytes], rate: float | None = None,
                  deadline: float | None = None) -> float:
    """Send values (all at once, or paced at ``rate`` per second); returns the start time."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, linger_ms=2, acks=1,
                                max_batch_size=256 * 1024)
    await producer.start()
    try:
        start = time.time()
        futs = []
        if rate is None:
            for v in values:
                futs.append(await producer.send(topic, value=v))
        else:
            sent = 0
            while sent < len(values):
                if deadline is not None and time.monotonic() > deadline:
                    break
                due = min(len(values), int((time.time() - start) * rate) + 1)
                while sent < due:
                    futs.append(await producer.send(topic, value=values[sent]))
                    sent += 1
                await asyncio.sleep(0.005)
        await asyncio.gather(*futs)
        return start
    finally:
        await producer.stop()


class Outputs:
    """Counts and reads what arrived on the responses and dead-letter topics."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._c: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []

    async def __aenter__(self) -> Outputs:
        self._c = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False,
                                   auto_offset_reset="earliest")
        await self._c.start()
        self._tps = [TopicPartition(t, p) for t in (self.topics.responses, self.topics.dlq)
                     for p in range(PARTITIONS)]
        self._c.assign(self._tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._c is not None
        await self._c.stop()

    async def count(self) -> int:
        assert self._c is not None
        ends = await self._c.end_offsets(self._tps)
        return sum(ends.values())

    async def wait(self, n: int, timeout: float, interval: float = 0.1) -> int:
        deadline = time.monotonic() + timeout
        got = 0
        while time.monotonic() < deadline:
            got = await self.count()
            if got >= n:
                return got
            await asyncio.sleep(interval)
        return got

    async def read(self) -> list[tuple[str, int, dict[str, Any]]]:
        """Every output so far as (topic, publish timestamp ms, value)."""
        c = self._c
        assert c is not None
        ends = await c.end_offsets(self._tps)
        await c.seek_to_beginning(*self._tps)
        out: list[tuple[str, int, dict[str, Any]]] = []
        want = sum(ends.values())
        deadline = time.monotonic() + 60
        while len(out) < want and time.monotonic() < deadline:
            batches = await c.getmany(timeout_ms=500, max_records=20_000)
            for tp, msgs in batches.items():
                for m in msgs:
                    out.append((tp.topic, m.timestamp, orjson.loads(m.value)))
        return out
