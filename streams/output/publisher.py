"""The output publisher: writes output records to Kafka and returns once the broker has them.

Usage::

    async with KafkaPublisher(lambda: start_producer(settings), metrics) as publisher:
        await publisher.publish("llm.responses", key, value)
        refused = await publisher.publish_many([OutRecord(topic, key, value)])
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
    UnknownProducerId,
)

from streams.errors import OutputTooLarge
from streams.metrics import PipelineMetrics
from streams.output.records import Headers, OutRecord

log = logging.getLogger("streams.kafka")

# aiokafka's sender task dies on these and every later send fails with the same error:
# only a new producer (a new producer id) can publish again. A broker restart can cause the
# first one.
_PRODUCER_DEAD = (OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId, InvalidProducerEpoch)



class KafkaPublisher:
    """Publishes an output record and returns only once the broker acknowledged it.

    Transient failures are retried with capped backoff for as long as it takes: the offset
    of the request is not committed meanwhile, so the partition waits instead of losing it.
    A producer that failed for good (``_PRODUCER_DEAD``) is replaced by a new one from
    ``connect``. Owns its producer: use it as an async context manager.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[AIOKafkaProducer]],
        metrics: PipelineMetrics,
        max_backoff: float = 5.0,
    ) -> None:
        self._connect = connect
        self._producer: AIOKafkaProducer | None = None
        self._replacing = asyncio.Lock()
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._last_log = 0.0

    async def __aenter__(self) -> KafkaPublisher:
        self._producer = await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def publish(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        delay = 0.05
        while True:
            producer = self._producer
            assert producer is not None, "publish() outside 'async with'"
            try:
                fut = await producer.send(topic, value=value, key=key, headers=headers)
                await fut
                return
            except (MessageSizeTooLargeError, RecordTooLargeError) as exc:
                raise OutputTooLarge(f"output record of {len(value)} bytes refused: {exc}") from None
            except KafkaError as exc:
                self._metrics.publish_errors.inc()
                now = time.monotonic()
                if now - self._last_log > 5.0:
                    self._last_log = now
                    log.warning("publish to %s failed (%s); retrying", topic, type(exc).__name__)
                if isinstance(exc, _PRODUCER_DEAD):
                    await self._replace(producer, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def publish_many(self, records: list[OutRecord]) -> list[OutputTooLarge | None]:
        """Send every record before waiting for any; then ``publish`` those that failed."""
        producer = self._producer
        assert producer is not None, "publish_many() outside 'async with'"
        send = producer.send
        sent: list[asyncio.Future[Any] | KafkaError] = []
        for r in records:
            try:
                sent.append(await send(r.topic, value=r.value, key=r.key, headers=r.headers))
            except KafkaError as exc:  # refused before sending (size, metadata): one by one below
                sent.append(exc)
        out: list[OutputTooLarge | None] = []
        for r, fut in zip(records, sent, strict=True):
            if not isinstance(fut, KafkaError):
                try:
                    await fut
                    out.append(None)
                    continue
                except KafkaError:
                    pass
            try:
                await self.publish(r.topic, r.key, r.value, r.headers)
                out.append(None)
            except OutputTooLarge as exc:
                out.append(exc)
        return out

    async def _replace(self, broken: AIOKafkaProducer, why: KafkaError) -> None:
        async with self._replacing:
            replaced = self._producer is not broken  # by another publish already
            if not replaced:
                try:
                    self._producer = await self._connect()
                except KafkaError as exc:  # the broker is away: the next failure tries again
                    log.warning("could not start a new producer (%s)", type(exc).__name__)
                    return
        if not replaced:
            log.warning("producer failed for good (%s); replaced by a new one", type(why).__name__)
            await broken.stop()  # its sender is dead, so stop() does not wait for a flush
