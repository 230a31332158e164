"""The front stage: how a consumed record becomes a request, and an answer its output record.

The processor runs every record through one ``Front``. ``NativeFront`` is the request
topic's (the wire contract, ``contract.py``); a pipeline's front
(``streams/pipelines/front.py``) renders an event into a request and its answer into an
enriched event, so pipelines share the whole record path: the batch prefetch, the cache,
coalescing, idempotency, dispatch, dead letters and acks.

Usage::

    processor = Processor(settings, publisher, dispatcher, cache, metrics,
                          front=NativeFront(settings))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from streams.config import Settings
from streams.contract import Completion, Request, parse_request, response_record
from streams.output.deadletters import Received
from streams.output.records import Headers

Dispatch = Callable[[Request], Awaitable[Completion]]


class Record(Received, Protocol):
    """A consumed record (``processor.InRecord``)."""

    @property
    def headers(self) -> Any: ...


class Front(Protocol):
    def parse(self, rec: Record) -> Request:
        """The record's request; raises ``ValidationFailed`` (a dead letter of its type)."""
    def answer(self, req: Request, dispatch: Dispatch) -> Awaitable[Completion]:
        """The answer to cache and publish (a pipeline validates and repairs it here)."""
    def record(self, rec: Record, req: Request, comp: Completion, latency_ms: int,
               cost: dict[str, Any] | None) -> bytes:
        """The output record's value (``cost``: the answer's ``cost`` object, None unpriced)."""
    def headers(self, rec: Record) -> Headers | None:
        """The output record's headers."""
    def observe(self, rec: Record, outcome: str) -> None:
        """A record is finished with ``outcome`` (ok, cached, replayed, dead_letter_<type>)."""


class NativeFront:
    """The requests topic: records are requests (``contract.parse_request``)."""

    def __init__(self, settings: Settings) -> None:
        self._max_bytes = settings.limits.max_value_bytes
        self._default_model = settings.worker.default_model
        self._max_ttl = settings.cache.max_ttl_seconds

    def parse(self, rec: Record) -> Request:
        return parse_request(rec.value, max_bytes=self._max_bytes,
                             default_model=self._default_model, max_ttl=self._max_ttl)

    def answer(self, req: Request, dispatch: Dispatch) -> Awaitable[Completion]:
        return dispatch(req)

    def record(self, rec: Record, req: Request, comp: Completion, latency_ms: int,
               cost: dict[str, Any] | None) -> bytes:
        return response_record(req, comp, latency_ms=latency_ms, cost=cost)

    def headers(self, rec: Record) -> Headers | None:
        return None

    def observe(self, rec: Record, outcome: str) -> None:
        return None
