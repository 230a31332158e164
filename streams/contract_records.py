"""The contract's output records: the response record (with the upstream's usage) and the dead letter.

``dead_letter_record`` never raises: if the full record cannot be encoded it falls back to a
minimal one with the raw value in base64 (``minimal_dead_letter``). The request record and its
parsing are in ``contract.py``, which re-exports every name here.

Usage::

    value = response_record(req, completion, latency_ms=12)
    value, headers = dead_letter_record(error=exc, source=src, value=raw, request=req, ...)
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from streams.contract_values import value_problem
from streams.embedding import embedding_record
from streams.errors import StreamsError

if TYPE_CHECKING:
    from streams.contract import Request

log = logging.getLogger("streams.contract")  # the name its log lines have always had

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
# No real answer counts more tokens; above this a count is not exact as a float (Prometheus).
MAX_TOKEN_COUNT = 2**53 - 1


def upstream_usage(body: Mapping[str, Any]) -> dict[str, int] | None:
    """The body's ``usage`` counts (a missing count is 0), or None when unknown.

    Unknown: no ``usage`` object, or one whose counts are not all integers in
    ``[0, MAX_TOKEN_COUNT]`` (a bool is not a count). Upstreams are not trusted: an invalid
    usage is never counted or charged, and never fails the answer it came with.
    """
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    out = {}
    for key in USAGE_KEYS:
        v = usage.get(key, 0)
        if type(v) is not int or not 0 <= v <= MAX_TOKEN_COUNT:
            return None
        out[key] = v
    return out


def usage_is_invalid(body: Mapping[str, Any]) -> bool:
    """True when the body carries a ``usage`` that ``upstream_usage`` refuses."""
    return body.get("usage") is not None and upstream_usage(body) is None


@dataclass(slots=True)
class Completion:
    """What a successful dispatch (or a cache hit) yields."""

    model: str
    body: dict[str, Any]
    endpoint: str | None
    attempts: int
    cached: bool = False
    endpoints: list[str] = field(default_factory=list)
    # ``usage`` of the body it was computed from (the record, the metrics and the cost each
    # read it: computed once per answer)
    _usage: tuple[dict[str, Any], dict[str, int]] | None = field(
        default=None, init=False, repr=False, compare=False)

    @property
    def output(self) -> str | None:
        try:
            content = self.body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None

    @property
    def usage(self) -> dict[str, int]:
        """The upstream's token counts; all 0 when it sent none or an invalid one."""
        memo = self._usage
        if memo is None or memo[0] is not self.body:
            memo = self._usage = (self.body, upstream_usage(self.body) or dict.fromkeys(USAGE_KEYS, 0))
        return dict(memo[1])  # the caller's own copy


def response_record(req: Request, comp: Completion, *, latency_ms: int,
                    cost: dict[str, Any] | None = None) -> bytes:
    if req.kind == "embedding":
        return embedding_record(req, comp, latency_ms=latency_ms, cost=cost)
    return orjson.dumps(
        {
            "id": req.id,
            "status": "ok",
            "model": comp.model,
            "endpoint": None if comp.cached else comp.endpoint,
            "output": comp.output,
            "response": comp.body,
            "usage": comp.usage,
            "cached": comp.cached,
            "attempts": comp.attempts,
            "latency_ms": latency_ms,
            "metadata": req.metadata, "cost": cost,
        }
    )


@dataclass(slots=True, frozen=True)
class Source:
    """Where a record came from."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # epoch ms


def _raw_field(value: bytes | None, limit: int) -> dict[str, Any]:
    if value is None:
        return {"raw": None}
    cut = value[:limit]
    try:
        return {"raw": cut.decode("utf-8")}
    except UnicodeDecodeError:
        if len(cut) < len(value):  # the cut may have split a character of valid UTF-8
            try:
                value.decode("utf-8")
                return {"raw": cut.decode("utf-8", errors="ignore")}
            except UnicodeDecodeError:
                pass
        return {"raw": base64.b64encode(cut).decode("ascii"), "raw_encoding": "base64"}


def dead_letter_record(
    *,
    error: StreamsError,
    source: Source,
    value: bytes | None,
    request: Request | None,
    request_id: str | None,
    attempts: int,
    endpoints: list[str],
    raw_limit: int,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The dead-letter value and its Kafka Connect style headers. Never raises.

    When the full record cannot be built or encoded (a value the encoder refuses, a bug), the
    minimal one from ``minimal_dead_letter`` is returned instead.
    """
    message = _text(str(error))
    headers = [
        ("__connect.errors.topic", _text(source.topic).encode()),
        ("__connect.errors.partition", str(source.partition).encode()),
        ("__connect.errors.offset", str(source.offset).encode()),
        ("__connect.errors.exception.class.name", type(error).__name__.encode()),
        ("__connect.errors.exception.message", message[:1000].encode()),
    ]
    try:
        doc: dict[str, Any] = {
            "id": request.id if request is not None else request_id,
            "error": {
                "type": error.dlq_type,
                "message": message,
                "status": error.status,
                "retryable": bool(error.retryable),
                **({"details": error.details} if error.details else {}),
            },
            "attempts": attempts,
            "endpoints": endpoints,
            "request": request.model_dump(mode="json") if request is not None else None,
            "source": _source(source),
            "failed_at": _now(),
        }
        doc.update(_raw_field(value, raw_limit))
        return orjson.dumps(doc), headers
    except Exception as exc:  # never let a dead letter fail: the minimal one always encodes
        log.error("dead letter of %s:%d@%d fell back to the minimal record: %s: %s",
                  source.topic, source.partition, source.offset, type(exc).__name__, exc)
        return minimal_dead_letter(error, source, value, request_id, raw_limit), headers


def minimal_dead_letter(
    error: StreamsError, source: Source, value: bytes | None, request_id: str | None,
    raw_limit: int,
) -> bytes:
    """The smallest dead letter: what identifies the record, the error, the raw value (base64).

    Built only from values that always encode (the id only if it is a plain short string).
    """
    rid = request_id if isinstance(request_id, str) and len(request_id) <= 256 else None
    status = error.status if type(error.status) is int and value_problem(error.status) is None else None
    raw = None if value is None else base64.b64encode(value[:max(0, raw_limit)]).decode("ascii")
    doc: dict[str, Any] = {
        "id": _text(rid) if rid is not None else None,
        "error": {"type": _text(str(error.dlq_type)), "message": _text(str(error))[:1000],
                  "status": status,
                  "retryable": bool(error.retryable)},
        "attempts": 0,
        "endpoints": [],
        "request": None,
        "source": _source(source),
        "failed_at": _now(),
        "raw": raw,
        "raw_encoding": "base64",
        "truncated": value is not None and len(value) > raw_limit,
        "fallback": True,
    }
    return orjson.dumps(doc)


def _source(source: Source) -> dict[str, Any]:
    return {"topic": _text(source.topic), "partition": source.partition,
            "offset": source.offset, "timestamp": source.timestamp}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(text: str) -> str:
    """``text`` as valid UTF-8 (a lone surrogate, which orjson refuses, becomes an escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
