"""The one Redis guard: maps Redis errors and keeps the outage state of each user of Redis.

Two kinds of error are told apart (``is_outage``): an outage (no connection, a timeout, a
server that refuses every command: OOM, READONLY, LOADING...) makes the user leave Redis alone
for a while (``RedisGuard.available``); an error about one command's arguments (a TTL out of
range, a wrong type) fails that command only and is logged at most once per interval
(``CommandErrorLog``). The cache, the rate limiter and the cooldowns each own one guard.

On a Redis Cluster the client follows MOVED/ASK and retries across a failover
(``redis_cluster``): those never get here. What does: the client giving up (an outage, as a
server that does not answer), a redirection still unresolved after its retries (the slot map in
flux: an outage), and a full per-node connection pool (``MaxConnectionsError``: that command
only, no outage, as a single server's pool would wait for a connection).

Usage::

    guard = RedisGuard(clock=time.monotonic, retry_seconds=0.5, max_retry_seconds=10.0,
                       on_down=lambda exc: log.warning(...), on_up=lambda: log.warning(...),
                       commands=CommandErrorLog(log, "rate limits"))
    if guard.available():
        try:
            ...  # a Redis call
        except REDIS_ERRORS as exc:
            guard.failed("acquire", exc)   # True for an outage
        else:
            guard.succeeded()
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import (
    AskError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    DataError,
    MaxConnectionsError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from streams.logs import LogThrottle

T = TypeVar("T")

# RedisClusterException is no RedisError: the cluster client raises it when no node answers.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
# Error replies that speak of the server's state, not of one command: every command would
# get them (redis-py maps some to their own classes, the others arrive as ResponseError).
_SERVER_STATE_CODES = frozenset(
    {"OOM", "READONLY", "LOADING", "MISCONF", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
     "NOREPLICAS", "NOAUTH", "MOVED", "ASK"}
)
_SERVER_STATE_CLASSES = (
    OutOfMemoryError, ReadOnlyError, ClusterDownError, TryAgainError,
    AuthenticationWrongNumberOfArgsError,  # the connection's AUTH, not our command
    AskError,  # and MovedError: a redirection the cluster client did not resolve
)
_PIPELINE_PREFIX = "of pipeline caused error: "


def is_outage(exc: BaseException) -> bool:
    """False for an error about one command (its arguments, a key's type), True otherwise.

    A command error (``ResponseError`` with an ``ERR``/``WRONGTYPE``... reply, or a
    ``DataError`` raised before sending) says nothing about Redis being usable: treating it
    as an outage would bypass Redis for every request because of one request's value.
    """
    if isinstance(exc, DataError | MaxConnectionsError):
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
        self._throttle = LogThrottle(interval, clock)

    def note(self, exc: BaseException) -> None:
        if count := self._throttle.due():
            self._log.warning(
                "redis refused a command for %s (%s); that command failed, redis stays in use "
                "(%d such errors since last report)",
                self._what, command_error_text(exc), count,
            )


class _Down(enum.Enum):
    DOWN = "down"


DOWN = _Down.DOWN  # "Redis did not answer", distinct from a None (missing key)


class RedisGuard:
    """Outage state of one user of Redis, and the mapping of its Redis errors.

    After an outage Redis is left alone for ``retry_seconds``, doubled after each further
    outage up to ``max_retry_seconds`` (None: always ``retry_seconds``). ``on_down(exc)`` is
    called when an outage begins, ``on_up()`` when Redis answers again. ``on_error(op, exc,
    outage)``, if given, sees every error (the cache counts and logs them itself); else command
    errors go to ``commands``.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        retry_seconds: float,
        max_retry_seconds: float | None = None,
        on_down: Callable[[BaseException], None] = lambda exc: None,
        on_up: Callable[[], None] = lambda: None,
        commands: CommandErrorLog | None = None,
        on_error: Callable[[str, BaseException, bool], None] | None = None,
    ) -> None:
        self._clock = clock
        self._retry_min = retry_seconds
        self._retry_max = retry_seconds if max_retry_seconds is None else max_retry_seconds
        self._delay = retry_seconds
        self._retry_at = float("-inf")
        self.answered_at = float("-inf")  # when Redis last answered (clock time)
        self._down = False
        self._on_down = on_down
        self._on_up = on_up
        self._commands = commands
        self._on_error = on_error

    @property
    def degraded(self) -> bool:
        """True from an outage until Redis answers again."""
        return self._down

    def available(self) -> bool:
        """May Redis be asked now (no outage, or its retry time has come)?"""
        return self._clock() >= self._retry_at

    def failed(self, op: str, exc: BaseException) -> bool:
        """Take note of a Redis error; True if it is an outage (Redis then left alone)."""
        outage = is_outage(exc)
        if outage:
            if not self._down:
                self._on_down(exc)
            self._down = True
            self._retry_at = self._clock() + self._delay
            self._delay = min(self._delay * 2, self._retry_max)
        if self._on_error is not None:
            self._on_error(op, exc, outage)
        elif not outage and self._commands is not None:
            self._commands.note(exc)
        return outage

    def succeeded(self) -> None:
        """Redis answered (even to a ``force`` call while it was left alone): an outage is over."""
        self.answered_at = self._clock()
        if self._down:
            self._down = False
            self._on_up()
        self._delay = self._retry_min
        self._retry_at = float("-inf")

    async def call(self, op: str, fn: Callable[[], Awaitable[T]], *, timeout: float,
                   force: bool = False, attempts: int = 1, backoff: float = 0.0) -> T | _Down:
        """``fn()`` within ``timeout``, or DOWN on a Redis error or while Redis is left alone
        (unless ``force``).

        After an outage error ``fn()`` is tried again, ``attempts`` times in all, sleeping
        ``backoff`` seconds, doubled each time; a command error is not (it would fail again).
        """
        if not force and not self.available():
            return DOWN
        delay = backoff
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                async with asyncio.timeout(timeout):
                    result = await fn()
            except REDIS_ERRORS as exc:
                if not self.failed(op, exc):
                    return DOWN
                continue
            self.succeeded()
            return result
        return DOWN

    def replies(self, op: str, results: list[Any]) -> list[bool]:
        """Which replies of a pipeline (run with ``raise_on_error=False``) succeeded; each
        failed command is noted, and one that speaks of an outage makes it one."""
        ok = []
        for result in results:
            failed = isinstance(result, BaseException)
            if failed:
                self.failed(op, result)
            ok.append(not failed)
        return ok
