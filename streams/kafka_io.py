"""Kafka plumbing outside faust: connection options, the check at start, topic creation and
the output publisher.

Usage::

    await check_kafka(settings)   # StartupError: wrong credentials, no broker answering
    await ensure_topics(settings)
    async with KafkaPublisher(lambda: start_producer(settings), metrics) as publisher:
        await publisher.publish("llm.responses", key, value)
    async with open_producer(settings) as producer:   # a plain producer (batch, dlq replay)
        ...
    AIOKafkaConsumer(**consumer_options(settings))    # connection and isolation level
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnknownProducerId,
    UnsupportedSaslMechanismError,
)

from streams.config import Settings
from streams.errors import StartupError
from streams.metrics import PipelineMetrics
from streams.processor import Headers, OutputTooLarge, OutRecord

log = logging.getLogger("streams.kafka")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    k = settings.kafka
    if k.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    ctx = ssl.create_default_context(cafile=k.ssl_cafile)
    if k.ssl_certfile:
        ctx.load_cert_chain(k.ssl_certfile, k.ssl_keyfile)
    return ctx


def connection_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for bootstrap servers and security."""
    k = settings.kafka
    opts: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers.split(","),
        "security_protocol": k.security_protocol,
    }
    ctx = ssl_context(settings)
    if ctx is not None:
        opts["ssl_context"] = ctx
    if k.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = k.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = k.sasl_username
        opts["sasl_plain_password"] = (
            k.sasl_password.get_secret_value() if k.sasl_password is not None else None
        )
    return opts


def consumer_options(settings: Settings) -> dict[str, Any]:
    """``connection_options`` plus what every consumer of ours reads with (isolation)."""
    return {**connection_options(settings), "isolation_level": settings.kafka.isolation_level}


async def check_kafka(settings: Settings, timeout: float = 10.0) -> None:
    """Connect (and authenticate) to the first bootstrap server that answers.

    aiokafka's own clients turn a refused login into "unable to bootstrap" after logging it;
    one plain connection here tells wrong credentials apart, so the worker can stop with
    one line naming the user and the server. Raises ``StartupError``; never shows a secret.
    """
    opts = connection_options(settings)
    servers: list[str] = opts.pop("bootstrap_servers")
    k = settings.kafka
    failures: list[str] = []
    for server in servers:
        host, _, port = server.strip().rpartition(":")
        try:
            conn = await create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **opts)
        except (SaslAuthenticationFailed, AuthenticationFailedError):
            raise StartupError(
                f"kafka authentication failed for user {k.sasl_username} ({k.mechanism}) "
                f"at {host}:{port}"
            ) from None
        except UnsupportedSaslMechanismError:
            raise StartupError(f"kafka at {host}:{port} does not offer SASL {k.mechanism}") from None
        except ssl.SSLError as exc:
            raise StartupError(f"kafka TLS handshake failed at {host}:{port}: {exc.reason}") from None
        except (KafkaError, OSError, TimeoutError, ValueError) as exc:
            refused = _ssl_cause(exc)  # TLS 1.3: a refused client certificate shows up here
            if refused is not None:
                raise StartupError(
                    f"kafka TLS handshake failed at {host}:{port}: {refused.reason}"
                ) from None
            failures.append(f"{host}:{port} ({type(exc).__name__})")
            continue
        conn.close()
        return
    raise StartupError(f"kafka not reachable at {', '.join(failures)}")


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind aiokafka's "connection closed", if one is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the requests, responses and dead-letter topics if missing; return those created."""
    admin = AIOKafkaAdminClient(
        client_id=f"{settings.kafka.client_id}-admin", request_timeout_ms=int(timeout * 1000),
        **connection_options(settings),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        t = settings.topics
        wanted = [n for n in (t.requests, t.responses, t.dead_letter) if n not in existing]
        if not wanted:
            return []
        new = [
            NewTopic(n, settings.kafka.partitions, settings.kafka.replication_factor)
            for n in wanted
        ]
        try:
            await admin.create_topics(new)
        except TopicAlreadyExistsError:  # another worker won the race
            pass
        return wanted
    finally:
        await admin.close()


# aiokafka's sender task dies on these and every later send fails with the same error:
# only a new producer (a new producer id) can publish again. A broker restart can cause the
# first one.
_PRODUCER_DEAD = (OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId, InvalidProducerEpoch)


async def start_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A started idempotent producer (acks=all, ``kafka.compression_type``); the caller stops it."""
    options: dict[str, Any] = {
        "client_id": settings.kafka.client_id,
        "acks": "all",
        "compression_type": settings.kafka.codec,
        "enable_idempotence": True,
        "linger_ms": 2,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30_000,
        **connection_options(settings),
        **overrides,
    }
    producer = AIOKafkaProducer(**options)
    await producer.start()
    return producer


@asynccontextmanager
async def open_producer(settings: Settings, **overrides: Any) -> AsyncIterator[AIOKafkaProducer]:
    producer = await start_producer(settings, **overrides)
    try:
        yield producer
    finally:
        await producer.stop()


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
