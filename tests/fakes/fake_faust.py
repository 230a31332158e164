"""Just enough of faust (events, messages, the app's consumer) to drive ``Runtime`` in unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from streams.cache.responses import ResponseCache
from streams.config import Settings
from streams.intake.processor import Answerer, Processor
from streams.intake.runtime import Runtime
from streams.output.records import Publisher
from tests.fakes.fake_redis import FakeRedis

TOPIC = "llm.requests"


@dataclass
class FakeConsumer:
    acked: list[tuple[Any, int]] = field(default_factory=list)


class FakeMessage:
    """faust's Message as far as the worker uses it; ``ack`` records into the consumer."""

    def __init__(self, offset: int, value: bytes | None, partition: int = 0) -> None:
        self.topic = TOPIC
        self.partition = partition
        self.offset = offset
        self.tp = (TOPIC, partition)
        self.key: bytes | None = f"k{offset}".encode()
        self.value = value
        self.headers: list[tuple[str, bytes]] | None = None
        self.timestamp = 1.0
        self.generation_id = 1
        self.acked = False

    def ack(self, consumer: FakeConsumer) -> bool:
        assert not self.acked, f"offset {self.offset} acked twice"
        self.acked = True
        consumer.acked.append((self.tp, self.offset))
        return True


class FakeEvent:
    def __init__(self, message: FakeMessage) -> None:
        self.message = message


class _Flow:
    def is_active(self) -> bool:
        return True


class FakeApp:
    consumer_generation_id = 1

    def __init__(self) -> None:
        self.consumer = FakeConsumer()
        self.flow_control = _Flow()


def events(values: list[bytes | None], partition: int = 0, start: int = 0) -> list[FakeEvent]:
    return [FakeEvent(FakeMessage(start + i, v, partition)) for i, v in enumerate(values)]


def runtime(settings: Settings, publisher: Publisher, dispatcher: Answerer,
            cache: bool = True) -> tuple[Runtime, FakeApp]:
    """A started Runtime over fakes: no Kafka, no Redis, no HTTP."""
    rt = Runtime(settings, CollectorRegistry())
    app = FakeApp()
    rt.app = app  # type: ignore[assignment]
    store = ResponseCache(settings, FakeRedis(), CollectorRegistry()) if cache else None  # type: ignore[arg-type]
    rt._processor = Processor(settings, publisher, dispatcher, store, rt.metrics)
    rt._ready.set()
    return rt, app
