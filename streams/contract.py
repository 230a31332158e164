"""The wire contract: request, response and dead-letter records (JSON, UTF-8).

Usage::

    req = parse_request(record_value, max_bytes=1 << 20, default_model="gpt-4o-mini")
    value = response_record(req, completion, latency_ms=12)
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streams.errors import StreamsError, ValidationFailed

# Parameters that would change the shape of the exchange: we send them ourselves or
# cannot honour them in a request/response stream.
_RESERVED_PARAMS = frozenset({"model", "messages", "stream"})


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    role: str = Field(min_length=1, max_length=64)
    content: str | list[Any] | None


class CacheControl(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl: int | None = Field(None, ge=1)
    no_cache: bool = False
    no_store: bool = False


class Request(BaseModel):
    """One prompt request, as read from the requests topic."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=256)
    messages: list[Message] | None = Field(None, min_length=1)
    input: str | None = None
    model: str | None = Field(None, min_length=1, max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(5, ge=0, le=9)
    tenant: str | None = Field(None, max_length=256)
    cache: CacheControl = CacheControl()
    deadline: int | None = Field(None, ge=0)
    metadata: Any = None

    @model_validator(mode="after")
    def _one_prompt(self) -> Request:
        if (self.messages is None) == (self.input is None):
            raise ValueError("exactly one of 'messages' or 'input' is required")
        reserved = _RESERVED_PARAMS.intersection(self.params)
        if reserved:
            raise ValueError(f"params may not set {sorted(reserved)}")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is None:
            return [{"role": "user", "content": self.input}]
        return [m.model_dump(exclude_none=False) for m in self.messages]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def parse_request(value: bytes | None, *, max_bytes: int, default_model: str) -> Request:
    """Validate a record value; raise ValidationFailed with a readable reason."""
    if value is None:
        raise ValidationFailed("record has no value (tombstone)")
    if len(value) > max_bytes:
        raise ValidationFailed(f"record value is {len(value)} bytes, over the {max_bytes} limit")
    try:
        req = Request.model_validate_json(value)
    except ValidationError as exc:
        raise ValidationFailed(_describe(exc)) from None
    except (ValueError, RecursionError) as exc:  # pydantic-core's own parser limits
        raise ValidationFailed(f"record value is not valid JSON: {exc}") from None
    if req.model is None:
        req = req.model_copy(update={"model": default_model})
    return req


def peek_id(value: bytes | None) -> str | None:
    """Best effort: the id of a record that failed validation, for its dead letter."""
    if not value:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 256 else None


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
        return upstream_usage(self.body) or dict.fromkeys(USAGE_KEYS, 0)


def response_record(req: Request, comp: Completion, *, latency_ms: int) -> bytes:
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
            "metadata": req.metadata,
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
    """The dead-letter value and its Kafka Connect style headers."""
    doc: dict[str, Any] = {
        "id": request.id if request is not None else request_id,
        "error": {
            "type": error.dlq_type,
            "message": str(error),
            "status": error.status,
            "retryable": bool(error.retryable),
        },
        "attempts": attempts,
        "endpoints": endpoints,
        "request": request.model_dump(mode="json") if request is not None else None,
        "source": {
            "topic": source.topic,
            "partition": source.partition,
            "offset": source.offset,
            "timestamp": source.timestamp,
        },
        "failed_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    doc.update(_raw_field(value, raw_limit))
    headers = [
        ("__connect.errors.topic", source.topic.encode()),
        ("__connect.errors.partition", str(source.partition).encode()),
        ("__connect.errors.offset", str(source.offset).encode()),
        ("__connect.errors.exception.class.name", type(error).__name__.encode()),
        ("__connect.errors.exception.message", str(error)[:1000].encode()),
    ]
    return orjson.dumps(doc), headers
