"""KafkaPublisher with fake producers: retries, and a producer that died is replaced."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, OutOfOrderSequenceNumber
from prometheus_client import CollectorRegistry

from streams import kafka_io
from streams.config import load_settings
from streams.metrics import PipelineMetrics
from streams.output.publisher import KafkaPublisher


class FakeProducer:
    def __init__(self, failures: list[type[Exception]] | None = None) -> None:
        self.failures = list(failures or [])
        self.sent: list[bytes] = []
        self.stopped = False

    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Any) -> Any:
        if self.failures:
            raise self.failures.pop(0)()
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        self.sent.append(value)
        return fut

    async def stop(self) -> None:
        self.stopped = True


def _publisher(producers: list[FakeProducer]) -> tuple[KafkaPublisher, list[FakeProducer]]:
    made: list[FakeProducer] = []

    async def connect() -> Any:
        made.append(producers[len(made)])
        return made[-1]

    return KafkaPublisher(connect, PipelineMetrics(CollectorRegistry()), max_backoff=0.01), made


async def test_a_dead_producer_is_replaced_once_and_every_record_published() -> None:
    # aiokafka fails every send of a producer whose sender died (here after a broker restart)
    dead = FakeProducer([OutOfOrderSequenceNumber] * 100)
    fresh = FakeProducer()
    publisher, made = _publisher([dead, fresh])
    async with publisher:
        await asyncio.gather(*(publisher.publish("t", None, b"v%d" % i) for i in range(20)))
    assert made == [dead, fresh] and dead.stopped and fresh.stopped
    assert sorted(fresh.sent) == sorted(b"v%d" % i for i in range(20))


async def test_transient_errors_are_retried_on_the_same_producer() -> None:
    flaky = FakeProducer([KafkaConnectionError, KafkaConnectionError])
    publisher, made = _publisher([flaky])
    async with publisher:
        await publisher.publish("t", b"k", b"v")
    assert made == [flaky] and flaky.sent == [b"v"]


async def test_our_producers_compress_and_our_consumers_read_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, **options: Any) -> None:
            made.append(options)

        async def start(self) -> None:
            return None

    monkeypatch.setattr(kafka_io, "AIOKafkaProducer", Recorder)
    zstd = load_settings(environ={}, kafka={"compression_type": "zstd"})
    await kafka_io.start_producer(zstd)
    await kafka_io.start_producer(load_settings(environ={}))
    assert [m["compression_type"] for m in made] == ["zstd", None]
    assert kafka_io.consumer_options(zstd)["isolation_level"] == "read_committed"
    loose = load_settings(environ={}, kafka={"isolation_level": "read_uncommitted"})
    assert kafka_io.consumer_options(loose)["isolation_level"] == "read_uncommitted"
