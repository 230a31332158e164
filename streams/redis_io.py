"""The Redis client of a worker, and its check at start.

``redis.url`` may be ``redis://``, ``rediss://`` (TLS; ``redis.ssl_cafile`` for a private CA)
or ``unix://``; with ``redis.cluster`` it names one node of a Redis Cluster and the client is
the cluster one (``redis_cluster``). The username and password come from the URL or from ``redis.username`` and
the environment variable ``redis.password_env`` names. Redis errors are translated here at
start. While running, every user of Redis (cache, rate limits, cooldowns) goes through one
``redis_guard.RedisGuard``.

Usage::

    client = open_redis(settings)
    await check_redis(client, settings)   # StartupError on wrong credentials
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from streams.config import Settings
from streams.errors import StartupError
from streams.redact import redact_url
from streams.redis_cluster import open_cluster
from streams.redis_conn import safe_connection_class
from streams.redis_guard import REDIS_ERRORS, command_error_text, is_outage

log = logging.getLogger("streams.redis")

# What every user of Redis is handed: a single server's client or a cluster's.
RedisClient = aioredis.Redis | RedisCluster


def open_redis(settings: Settings) -> RedisClient:
    """A client on ``redis.url`` (a cluster client with ``redis.cluster``); nothing connects
    before the first command."""
    r = settings.redis
    if r.cluster:
        return open_cluster(settings)
    extra: dict[str, Any] = {}
    if r.ssl_cafile:
        extra["ssl_ca_certs"] = r.ssl_cafile
    if r.username:
        extra["username"] = r.username
    # A bounded pool where a burst of commands waits for a connection (up to the socket
    # timeout) instead of failing with "Too many connections" and opening the cache circuit.
    pool = aioredis.BlockingConnectionPool.from_url(
        r.url.get_secret_value(),
        max_connections=r.max_connections,
        timeout=r.socket_timeout_seconds,
        password=r.password.get_secret_value() if r.password else None,
        socket_timeout=r.socket_timeout_seconds,
        socket_connect_timeout=r.socket_timeout_seconds,
        # A connection left stale by a Redis restart is retried once at once, so the
        # first command after an outage does not count as one more failure.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        health_check_interval=10,
        **extra,
    )
    pool.connection_class = safe_connection_class(pool.connection_class)
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


def redis_location(settings: Settings) -> str:
    """host:port (or the socket path) of ``redis.url``, for messages."""
    parts = urlsplit(settings.redis.url.get_secret_value())
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


async def check_redis(client: RedisClient, settings: Settings) -> bool:
    """PING once; return whether Redis answered.

    Wrong credentials, an untrusted TLS certificate or the wrong ``redis.cluster`` (a cluster
    node without it, a single server with it) raise ``StartupError`` (no restart can fix them).
    An unreachable Redis is only logged: the worker runs without it (cache bypassed, local
    limits) until it answers.
    """
    try:
        await client.ping()
    except ResponseError as exc:
        if is_outage(exc):
            _unreachable(settings, exc)
            return False
        # e.g. an ACL user without PING: Redis answered, so it is there
        log.warning("redis answered PING with an error (%s); continuing",
                    command_error_text(exc))
    except REDIS_ERRORS as exc:
        if (fatal := _fatal(exc, settings)) is not None:
            raise fatal from None
        _unreachable(settings, exc)
        return False
    else:
        if not settings.redis.cluster:
            await _refuse_cluster_node(client, settings)
    return True


def _fatal(exc: BaseException, settings: Settings) -> StartupError | None:
    """The error as a ``StartupError`` if no restart can fix it, else None."""
    where = redis_location(settings)
    if isinstance(exc, RedisClusterException):
        if "Cluster mode is not enabled" in str(exc):
            return StartupError(f"redis at {where} is not a Redis Cluster (cluster mode is "
                                "off there): set redis.cluster: false")
        exc = exc.__cause__ or exc  # the cluster client wraps the last node's error
    if isinstance(exc, AuthenticationError):
        return StartupError(f"redis authentication failed for user {settings.redis.user} "
                            f"at {where}")
    if isinstance(exc, RedisConnectionError) and isinstance(
        exc.__context__, ssl.SSLCertVerificationError
    ):
        return StartupError(f"redis TLS certificate not trusted at {where}: "
                            f"{exc.__context__.verify_message} (see redis.ssl_cafile)")
    return None


async def _refuse_cluster_node(client: RedisClient, settings: Settings) -> None:
    """A cluster node answers the single-server client until a key lives on another shard:
    then every command would fail with MOVED (an outage, for good). Stop at start instead."""
    try:
        info = await client.info("cluster")
    except REDIS_ERRORS:
        return  # e.g. an ACL user without INFO
    if str(info.get("cluster_enabled")) == "1":
        raise StartupError(f"redis at {redis_location(settings)} is a Redis Cluster node: "
                           "set redis.cluster: true")


async def redis_answers(client: RedisClient) -> bool:
    """PING for readiness: True once Redis answers, even with an error about the command
    itself (an ACL user without PING); an outage raises."""
    try:
        return bool(await client.ping())
    except ResponseError as exc:
        if is_outage(exc):
            raise
        return True


def _unreachable(settings: Settings, exc: BaseException) -> None:
    log.warning("redis not reachable at %s (%s); starting without it, retrying every second",
                redact_url(settings.redis.url.get_secret_value()), type(exc).__name__)
