"""Parking: a qualifying request is appended to the parked topic before its source offset is acked.

The parked record keeps the request's key and value as they were; a header holds where it
came from (topic, partition, offset, timestamp), so the coordinator answers it exactly as the
processor would have (same idempotency fingerprint, same dead-letter source). The publisher
returns once the broker acknowledged it (acks=all), and only then is the source offset
finished: a request waiting hours for its job never holds back its partition's commits.

Usage::

    parking = Parking(settings, policy, publisher, metrics)
    if parking.wants(req):
        outcome = await parking.park(rec, req)   # "parked"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from streams.batchapi.metrics import BatchMetrics
from streams.batchapi.policy import BatchPolicy
from streams.config import Settings
from streams.contract import Request, Source
from streams.output.deadletters import Received
from streams.output.records import Publisher

SOURCE_HEADER = "llm-streams.parked-from"


@dataclass(slots=True, frozen=True)
class ParkedRecord:
    """A request read back from the parked topic: its original record, and where it is parked."""

    source: Source  # the original record's (requests topic)
    key: bytes | None
    value: bytes | None
    offset: int  # in the parked partition
    parked_at: float  # epoch seconds (the parked record's timestamp)


def source_header(source: Source) -> bytes:
    return orjson.dumps([source.topic, source.partition, source.offset, source.timestamp])


def read_source(headers: Any) -> Source | None:
    """The original record's source from a parked record's headers, or None if absent/bad."""
    for name, raw in headers or ():
        if name != SOURCE_HEADER:
            continue
        try:
            topic, partition, offset, ts = orjson.loads(raw)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if (isinstance(topic, str) and all(type(v) is int for v in (partition, offset, ts))):
            return Source(topic, partition, offset, ts)
        return None
    return None


class Parking:
    """The processor's hook (``intake.processor.Parker``)."""

    def __init__(self, settings: Settings, policy: BatchPolicy, publisher: Publisher,
                 metrics: BatchMetrics) -> None:
        self._topic = settings.topics.parked_topic
        self._policy = policy
        self._publisher = publisher
        self._metrics = metrics

    def wants(self, req: Request) -> bool:
        return self._policy.wants(req)

    async def park(self, rec: Received, req: Request) -> str:
        """Append the record to the parked topic; returns once the broker has it."""
        headers = [(SOURCE_HEADER, source_header(rec.source))]
        await self._publisher.publish(self._topic, rec.key, rec.value or b"", headers)
        self._metrics.parked.inc()
        return "parked"
