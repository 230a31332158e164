"""The Redis client of a worker, and its check at start.

``redis.url`` may be ``redis://``, ``rediss://`` (TLS; ``redis.ssl_cafile`` for a private CA)
or ``unix://``; the username and password come from the URL or from ``redis.username`` and
the environment variable ``redis.password_env`` names. Redis errors are translated here at
start. While running, ``cache.py``, ``ratelimit.py`` and ``cooldown.py`` tell two kinds
apart with ``is_outage``: an outage (no connection, a timeout, a server that refuses every
command: OOM, READONLY, LOADING...) makes them leave Redis alone for a while; an error about
one command's arguments (a TTL out of range, a wrong type) fails that command only and is
logged at most once per interval (``CommandErrorLog``).

Usage::

    client = open_redis(settings)
    await check_redis(client, settings)   # StartupError on wrong credentials
    except REDIS_ERRORS as exc:
        if is_outage(exc): mark_down()
        else: command_errors.note(exc)
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    DataError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from streams.config import Settings
from streams.errors import StartupError
from streams.redact import redact_url

log = logging.getLogger("streams.redis")

REDIS_ERRORS = (RedisError, OSError, TimeoutError)
# Error replies that speak of the server's state, not of one command: every command would
# get them (redis-py maps some to their own classes, the others arrive as ResponseError).
_SERVER_STATE_CODES = frozenset(
    {"OOM", "READONLY", "LOADING", "MISCONF", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
     "NOREPLICAS", "NOAUTH"}
)
_SERVER_STATE_CLASSES = (
    OutOfMemoryError, ReadOnlyError, ClusterDownError, TryAgainError,
    AuthenticationWrongNumberOfArgsError,  # the connection's AUTH, not our command
)
_PIPELINE_PREFIX = "of pipeline caused error: "


def is_outage(exc: BaseException) -> bool:
    """False for an error about one command (its arguments, a key's type), True otherwise.

    A command error (``ResponseError`` with an ``ERR``/``WRONGTYPE``... reply, or a
    ``DataError`` raised before sending) says nothing about Redis being usable: treating it
    as an outage would bypass Redis for every request because of one request's value.
    """
    if isinstance(exc, DataError):
        return False
    if not isinstance(exc, ResponseError) or isinstance(exc, _SERVER_STATE_CLASSES):
        return True
    message = str(exc)
    if _PIPELINE_PREFIX in message:  # redis-py annotates errors raised from a pipeline
        message = message.split(_PIPELINE_PREFIX, 1)[1].lstrip("('\"")
    code = getattr(exc, "status_code", None) or message.split(" ", 1)[0]
    return code in _SERVER_STATE_CODES


def command_error_text(exc: BaseException) -> str:
    """The class and the server's reply, without the command's arguments (they may hold
    cached answers or request content)."""
    message = str(exc)
    if _PIPELINE_PREFIX in message:
        message = message.split(_PIPELINE_PREFIX, 1)[1]
    return f"{type(exc).__name__}: {message[:200]}"


class CommandErrorLog:
    """Logs Redis command errors (not outages) at most once per interval, with a count.

    Usage::

        errors = CommandErrorLog(log, "rate limits", interval=10.0)
        errors.note(exc)
    """

    def __init__(self, logger: logging.Logger, what: str, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._what = what
        self._interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._unreported = 0

    def note(self, exc: BaseException) -> None:
        self._unreported += 1
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._log.warning(
            "redis refused a command for %s (%s); that command failed, redis stays in use "
            "(%d such errors since last report)",
            self._what, command_error_text(exc), self._unreported,
        )
        self._last = now
        self._unreported = 0


def open_redis(settings: Settings) -> aioredis.Redis:
    """A client on ``redis.url``; nothing connects before the first command."""
    r = settings.redis
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
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


def redis_location(settings: Settings) -> str:
    """host:port (or the socket path) of ``redis.url``, for messages."""
    parts = urlsplit(settings.redis.url.get_secret_value())
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


async def check_redis(client: aioredis.Redis, settings: Settings) -> bool:
    """PING once; return whether Redis answered.

    Wrong credentials or an untrusted TLS certificate raise ``StartupError`` (no restart
    can fix them). An unreachable Redis is only logged: the worker runs without it (cache
    bypassed, local limits) until it answers.
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
    except AuthenticationError:
        raise StartupError(
            f"redis authentication failed for user {settings.redis.user} "
            f"at {redis_location(settings)}"
        ) from None
    except RedisConnectionError as exc:
        if isinstance(exc.__context__, ssl.SSLCertVerificationError):
            raise StartupError(
                f"redis TLS certificate not trusted at {redis_location(settings)}: "
                f"{exc.__context__.verify_message} (see redis.ssl_cafile)"
            ) from None
        _unreachable(settings, exc)
        return False
    except REDIS_ERRORS as exc:
        _unreachable(settings, exc)
        return False
    return True


async def redis_answers(client: aioredis.Redis) -> bool:
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
