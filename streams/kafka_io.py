"""Kafka plumbing outside faust: connection options, the check at start, topic creation, producers.

Usage::

    await check_kafka(settings)   # StartupError: wrong credentials, no broker answering
    await ensure_topics(settings)
    async with open_producer(settings) as producer:   # a plain producer (batch, dlq replay)
        ...
    AIOKafkaConsumer(**consumer_options(settings))    # connection and isolation level
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)

from streams.config import Settings
from streams.errors import StartupError

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


async def topic_partitions(settings: Settings, topic: str,
                           timeout: float = 30.0) -> list[TopicPartition]:
    """The partitions of ``topic`` now (none if it does not exist), through the admin API."""
    admin = AIOKafkaAdminClient(
        client_id=f"{settings.kafka.client_id}-admin", request_timeout_ms=int(timeout * 1000),
        **connection_options(settings),
    )
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):  # describing it could create it
            return []
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    found = [p["partition"] for t in described if t["topic"] == topic for p in t["partitions"]]
    return [TopicPartition(topic, p) for p in sorted(found)]
