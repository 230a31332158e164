"""Exceptions of llm-streams: the one error tree. A class that a retry may help says so.

Two flags, two questions: ``retry_now`` (the dispatcher may make another attempt at once:
``dispatch/retry.py`` reads it) and ``retryable`` (a replay of the request later may succeed:
the dead letter's ``error.retryable``). Both are False on ``StreamsError``; only the classes
a retry may help set them. They differ for ``AttemptsExhausted``: no attempt is left now, but
a replay may well succeed.

::

    StreamsError
    ├── ConfigError                 wrong configuration; the CLI prints one line and exits 2
    ├── StartupError                Kafka or Redis refused the worker at start (wrong
    │                               credentials, unreachable); one line, exit 1
    ├── ValidationFailed            a request record breaks the contract  -> DLQ "validation"
    │   └── TemplateFailed          a pipeline's template cannot render an event (a missing
    │                               field, named; a render error)        -> DLQ "template"
    ├── UpstreamError               an endpoint call failed               -> DLQ "upstream"
    │   ├── UpstreamStatusError     HTTP status >= 400 (retryable: 408, 429, 5xx)
    │   ├── UpstreamTimeout         the hard per-call timeout fired (retryable)
    │   ├── UpstreamConnectionError connect/reset/DNS (retryable)
    │   └── UpstreamBadResponse     2xx whose body is not a chat completion (not retryable)
    ├── AttemptsExhausted           retry.max_attempts used up            -> DLQ "exhausted"
    ├── DeadlineExpired             the request's deadline passed         -> DLQ "expired"
    ├── BudgetExceeded              the tenant's budget refused the request -> DLQ "budget"
    │                               (on_exhausted: reject, or the estimate alone exceeds a
    │                               whole window's budget: not retryable)
    ├── NoEndpoint                  no configured endpoint serves the model -> DLQ "upstream"
    ├── DispatchFailed              a request could not be answered: wraps one of the above
    │                               with its attempts and endpoints (the dead letter's content)
    ├── DispatcherStopped           ``dispatch()`` after ``stop()``: a caller's bug (also a
    │                               RuntimeError)                          -> DLQ "internal"
    ├── OutputTooLarge              the broker refuses an output record's size -> DLQ "internal"
    │                               (not retryable)
    ├── InternalError               a bug while handling a request        -> DLQ "internal"
    ├── ClaimLost                   the request's coalescing lock went to another worker
    │                               before its upstream call: the call is not made, the
    │                               coalescer waits for that worker's answer (never a DLQ)
    └── InvalidOutput               a pipeline's answer fails its schema after every repair
                                    (retryable: a new answer may pass)    -> DLQ "invalid_output"

Foreign exceptions (aiohttp, redis, aiokafka) are translated where they enter, in
``dispatch/upstream.py``, ``cache/``, ``dispatch/ratelimit.py``, ``output/publisher.py``,
``kafka_io.py`` and ``redis_io.py``. Messages
never contain secrets.
"""

from __future__ import annotations

from typing import Any

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class StreamsError(Exception):
    """Base of every llm-streams exception."""

    retry_now: bool = False  # another attempt now may succeed (the dispatcher retries)
    retryable: bool = False  # a replay later may succeed (the dead letter says so)
    dlq_type: str = "internal"
    status: int | None = None
    details: dict[str, Any] | None = None  # more for the dead letter's error (JSON values)


class ConfigError(StreamsError):
    """The configuration is invalid; the message names the key."""


class StartupError(StreamsError):
    """A dependency refused the worker at start; the message names it, never a secret."""


class ValidationFailed(StreamsError):
    """A request record does not satisfy the contract."""

    dlq_type = "validation"


class UpstreamError(StreamsError):
    """An upstream endpoint call failed."""

    dlq_type = "upstream"

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.retry_after = retry_after  # seconds the endpoint asked us to wait, if it did


class UpstreamStatusError(UpstreamError):
    """The endpoint answered with an HTTP error status."""

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_now = self.retryable = self.status in RETRYABLE_STATUS


class UpstreamTimeout(UpstreamError):
    retry_now = retryable = True


class UpstreamConnectionError(UpstreamError):
    retry_now = retryable = True


class UpstreamBadResponse(UpstreamError):
    """A 2xx answer that is not a chat completion."""


class AttemptsExhausted(StreamsError):
    dlq_type = "exhausted"
    retry_now = False  # the attempts are spent
    retryable = True  # but a replay later may succeed

    def __init__(self, message: str, last: StreamsError | None = None) -> None:
        super().__init__(message)
        self.last = last
        self.status = last.status if last is not None else None


class DeadlineExpired(StreamsError):
    dlq_type = "expired"


class BudgetExceeded(StreamsError):
    """The tenant's budget has no room (``on_exhausted: reject``) or never could have."""

    retry_now = False
    retryable = True  # a replay in a later window may succeed
    dlq_type = "budget"

    def __init__(self, message: str, *, never: bool = False) -> None:
        super().__init__(message)
        self.retryable = not never  # a request larger than a whole window fails again


class NoEndpoint(StreamsError):
    """No configured endpoint serves the request's model."""

    dlq_type = "upstream"


class DispatchFailed(StreamsError):
    """A request could not be answered; carries what the dead letter reports."""

    def __init__(self, error: StreamsError, attempts: int, endpoints: list[str]) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.endpoints = endpoints


class DispatcherStopped(StreamsError, RuntimeError):
    """``dispatch()`` was called after ``stop()`` (a bug in the caller; not retryable)."""


class OutputTooLarge(StreamsError):
    """The broker refuses an output record because of its size (not retryable)."""


class InternalError(StreamsError):
    """A bug or an unexpected failure while handling a request (dead letter "internal")."""


class ClaimLost(StreamsError):
    """The coalescing lock was lost before the upstream call (``dispatch/claim.py``); the
    coalescer catches it and waits for the new holder's answer."""


class TemplateFailed(ValidationFailed):
    """A pipeline's template could not render an event; the message names the field."""

    dlq_type = "template"
    request_id: str | None = None  # the event's id, when its template rendered


class InvalidOutput(StreamsError):
    """A pipeline's answer is not valid (JSON, schema) after its repairs.

    ``errors``: the validator's messages; ``raw``: the model's last answer (truncated); both
    go into the dead letter's ``error.details``.
    """

    retry_now = False
    retryable = True  # the model may answer validly next time
    dlq_type = "invalid_output"

    def __init__(self, message: str, errors: list[str], raw: str | None) -> None:
        super().__init__(message)
        self.details = {"errors": errors, "last_answer": raw}
