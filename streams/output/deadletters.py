"""Dead letters: the one output record of a request that could not be answered, always published.

Usage::

    letters = DeadLetters(settings, publisher, metrics)
    outcome = await letters.write(rec, error, req, request_id, attempts, endpoints)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from streams.config import Settings
from streams.contract import Request, Source, dead_letter_record, minimal_dead_letter, peek_id
from streams.errors import InternalError, OutputTooLarge, StreamsError
from streams.logs import request_extra
from streams.metrics import PipelineMetrics
from streams.output.records import Headers, Publisher
from streams.redact import Redactor

log = logging.getLogger("streams.processor")


class Received(Protocol):
    """The consumed record a dead letter speaks of."""

    @property
    def source(self) -> Source: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


def original_headers(headers: Any) -> Headers:
    """A consumed record's headers as (name, bytes) pairs: what the client gave, or none."""
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    # a null header value (Kafka allows one) travels as empty bytes
    return [(str(k), v if isinstance(v, bytes) else b"" if v is None else str(v).encode())
            for k, v in items]


class DeadLetters:
    """Publishes dead letters to ``topics.dead_letter``, smaller and smaller if refused."""

    def __init__(self, settings: Settings, publisher: Publisher, metrics: PipelineMetrics) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._topic = settings.topics.dead_letter
        self._raw_limit = settings.worker.dlq_raw_limit_bytes
        self._redact = Redactor(settings.secret_values())

    async def internal(self, rec: Received, exc: BaseException, req: Request | None = None) -> str:
        """An ``internal`` dead letter for a record whose handling failed unexpectedly (a bug),
        logged with its traceback. Never raises (except on cancellation); the outcome label."""
        rid = req.id if req is not None else peek_id(rec.value)
        log.error("internal error", exc_info=exc, extra=request_extra(rid))
        try:
            text = f"{type(exc).__name__}: {exc}"
        except Exception:  # an exception whose str() fails
            text = type(exc).__name__
        # Text we do not control goes into the dead letter: mask any secret in it.
        return await self.write(rec, InternalError(self._redact(text)), req, rid, 0, [])

    async def write(
        self,
        rec: Received,
        error: StreamsError,
        req: Request | None,
        request_id: str | None,
        attempts: int,
        endpoints: list[str],
    ) -> str:
        """Publish the record's dead letter; never raises (except on cancellation).

        The full record first; if the broker refuses its size, or publishing it fails
        unexpectedly, the minimal one (``minimal_dead_letter``), with less of the raw value each
        time, and last without its key and headers. (Kafka errors never get here: the publisher
        retries those until it is cancelled.) Only if even that cannot be published is the
        record given up (logged, counted as ``unpublished``) rather than stall its partition.
        """
        kind = error.dlq_type
        rid = req.id if req is not None else request_id
        raw_limit = self._raw_limit
        value, full_headers = dead_letter_record(
            error=error, source=rec.source, value=rec.value, request=req, request_id=request_id,
            attempts=attempts, endpoints=endpoints, raw_limit=raw_limit,
        )
        # The record's own headers follow Kafka Connect's (KIP-298 keeps them): a replay
        # republishes them with the original value.
        headers: Headers | None = full_headers + original_headers(getattr(rec, "headers", None))
        key: bytes | None = rec.key
        for limit in (None, min(raw_limit, 1024), 0, -1):
            if limit is not None:
                value = minimal_dead_letter(error, rec.source, rec.value, rid, max(limit, 0))
            if limit == -1:  # the bare record: no key and no headers either (one may be the cause)
                key, headers = None, None
            try:
                await self._publisher.publish(self._topic, key, value, headers)
                break
            except asyncio.CancelledError:
                raise
            except OutputTooLarge:  # even the dead letter is too big: keep what identifies it
                continue
            except Exception:
                log.exception("dead letter of %s:%d@%d not published", rec.source.topic,
                              rec.source.partition, rec.source.offset)
        else:
            self._metrics.output("unpublished")
            return "unpublished"
        self._metrics.dead_letters.labels(kind).inc()
        self._metrics.output(f"dead_letter_{kind}")
        if kind == "validation":  # the sender's fault, maybe thousands: not worth a warning
            log.debug("dead letter validation: %s", error, extra=request_extra(request_id))
        else:
            log.warning("dead letter %s: %s", kind, error, extra=request_extra(request_id))
        return f"dead_letter_{kind}"
