"""Retry policy: which failures to retry, and how long to wait before the next attempt.

Retryable: connection errors, timeouts, HTTP 408, 429, 500, 502, 503, 504 (the
``retry_now`` flag of each ``StreamsError``). Everything else is terminal.

The delay is exponential with full jitter: uniform in ``[base, min(max, base * 2**n)]``
after the n-th failed attempt, so it stays between ``retry.base_delay_ms`` and
``retry.max_delay_ms``. When the endpoint said how long to wait (Retry-After,
retry-after-ms, x-ratelimit-reset-*, parsed by ``upstream.parse_retry_after`` into
``UpstreamError.retry_after``), that replaces the backoff, capped at
``retry.max_retry_after_ms``. Every wait an endpoint asks for passes ``bounded_wait``: a
value that is not a number (NaN) counts as not asked, anything else lands in ``[0, cap]``.

Usage::

    backoff = Backoff(settings.retry, rand=random.Random(7).random)
    if is_retryable(exc):
        await asyncio.sleep(backoff.delay(attempts, exc))
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from streams.config import RetryConfig
from streams.errors import (
    StreamsError,
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)


def bounded_wait(seconds: float | None, cap: float) -> float | None:
    """``seconds`` clamped to ``[0, cap]``; None when absent or NaN (no wait was asked).

    Waits come from outside (headers, Redis): ``inf`` becomes ``cap``, a negative one 0.
    """
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), cap)


def is_retryable(exc: BaseException) -> bool:
    """True when another attempt may succeed (the error class says so)."""
    return isinstance(exc, StreamsError) and bool(exc.retry_now)


def error_class(exc: BaseException) -> str:
    """A short, bounded label for metrics: what kind of failure this was."""
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamConnectionError):
        return "connection"
    if isinstance(exc, UpstreamBadResponse):
        return "bad_response"
    if isinstance(exc, UpstreamStatusError):
        status = exc.status or 0
        if status == 429:
            return "rate_limited"
        if status == 408:
            return "timeout"
        if status >= 500:
            return "server_error"
        return "client_error"
    return "other"


def is_rate_limited(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamStatusError) and exc.status == 429


def hurts_health(exc: BaseException) -> bool:
    """Whether this failure counts against the endpoint (towards a cooldown).

    A terminal 4xx is the request's fault: the endpoint answered, so it is alive.
    """
    return is_retryable(exc) or isinstance(exc, UpstreamBadResponse)


class Backoff:
    """Computes retry delays in seconds; ``rand`` returns floats in [0, 1)."""

    def __init__(self, config: RetryConfig, rand: Callable[[], float] = random.random) -> None:
        self._base = config.base_delay_ms / 1000.0
        self._max = config.max_delay_ms / 1000.0
        self._max_retry_after = config.max_retry_after_ms / 1000.0
        self._rand = rand

    def retry_after(self, exc: BaseException | None) -> float | None:
        """The wait the endpoint asked for, capped by config; None if it asked nothing."""
        if isinstance(exc, UpstreamError):
            return bounded_wait(exc.retry_after, self._max_retry_after)
        return None

    def delay(self, failures: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1 = first failure)."""
        asked = self.retry_after(exc)
        if asked is not None:
            return asked
        low = min(self._base, self._max)
        # 2**n grows without bound; cap the exponent so the float never overflows.
        high = min(self._max, self._base * (2.0 ** min(max(failures, 1), 60)))
        return low + self._rand() * max(high - low, 0.0)
