"""The wire contract: request, response and dead-letter records (JSON, UTF-8).

A request that parses is also one we can write back: every integer in it fits in int64,
every number is finite, ``cache.ttl`` is at most ``cache.max_ttl_seconds`` and ``deadline``
is an epoch-millisecond time (2000-01-01 to 2100-01-01). Anything else is a
``ValidationFailed`` naming the field, so no value can break a response or a dead letter
later. ``dead_letter_record`` never raises: if the full record cannot be encoded it falls
back to a minimal one with the raw value in base64.

Usage::

    req = parse_request(record_value, max_bytes=1 << 20, default_model="gpt-4o-mini")
    value = response_record(req, completion, latency_ms=12)
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streams.embedding import check_embedding, embedding_record
from streams.errors import StreamsError, ValidationFailed

log = logging.getLogger("streams.contract")

ChatMessages = list[dict[str, Any]]  # OpenAI chat messages, as sent upstream
Params = Mapping[str, Any]  # the request's other chat-completion parameters

# Parameters that would change the shape of the exchange: we send them ourselves or
# cannot honour them in a request/response stream.
_RESERVED_PARAMS = frozenset({"model", "messages", "stream"})

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_MAX_TTL = 30 * 86_400  # cache.max_ttl_seconds
# A deadline is epoch ms: anything outside this window is a unit mistake (seconds, µs) or junk.
DEADLINE_MIN_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
DEADLINE_MAX_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z


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
    kind: Literal["chat", "embedding"] = "chat"  # embedding: see streams/embedding.py
    batch_api: bool | None = Field(None, strict=True)  # a Batch API; None: by the policy

    @model_validator(mode="after")
    def _one_prompt(self) -> Request:
        if self.kind == "embedding":
            check_embedding(self.input, self.messages, self.params)
        if (self.messages is None) == (self.input is None):
            raise ValueError("exactly one of 'messages' or 'input' is required")
        reserved = _RESERVED_PARAMS.intersection(self.params)
        if reserved:
            raise ValueError(f"params may not set {sorted(reserved)}")
        return self

    def chat_messages(self) -> ChatMessages:
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


def parse_request(
    value: bytes | None, *, max_bytes: int, default_model: str, max_ttl: int = DEFAULT_MAX_TTL
) -> Request:
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
    _check_ranges(req, max_ttl)
    if req.model is None:
        req = req.model_copy(update={"model": default_model})
    return req


def _check_ranges(req: Request, max_ttl: int) -> None:
    """What pydantic accepts but downstream cannot hold: raise ValidationFailed naming the field."""
    ttl = req.cache.ttl
    if ttl is not None and not 1 <= ttl <= max_ttl:
        raise ValidationFailed(f"cache.ttl: must be between 1 and {max_ttl} seconds "
                               "(cache.max_ttl_seconds)")
    if req.deadline is not None and not DEADLINE_MIN_MS <= req.deadline < DEADLINE_MAX_MS:
        raise ValidationFailed("deadline: must be an epoch time in milliseconds between "
                               "2000-01-01 and 2100-01-01")
    where = [("metadata", req.metadata), ("params", req.params)]
    for i, msg in enumerate(req.messages or ()):
        if isinstance(msg.content, list):
            where.append((f"messages[{i}].content", msg.content))
        for key, extra in (msg.model_extra or {}).items():
            where.append((f"messages[{i}].{key}", extra))
    for path, doc in where:
        bad = unrepresentable(doc, path)
        if bad is not None:
            raise ValidationFailed(bad)


def unrepresentable(doc: Any, path: str) -> str | None:
    """Why a parsed JSON value cannot be written back (its path and reason), or None.

    Integers must fit in int64, numbers must be finite, and only JSON's own types are allowed.
    Iterative (no recursion limit); paths are built only once something is wrong.
    """
    todo: list[Any] = [doc]
    while todo:
        value = todo.pop()
        kind = type(value)
        if kind is dict:
            todo.extend(value.values())
        elif kind is list:
            todo.extend(value)
        elif _problem(value) is not None:
            return _locate(doc, path)
    return None


def _problem(value: Any) -> str | None:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return None
    if kind is int:
        return None if INT64_MIN <= value <= INT64_MAX else "integer outside the 64-bit signed range"
    if kind is float:
        return None if math.isfinite(value) else "number is not finite"
    return f"a {kind.__name__} is not a JSON value"


def _locate(doc: Any, path: str) -> str:
    todo: list[tuple[Any, str]] = [(doc, path)]
    while todo:
        value, where = todo.pop()
        if type(value) is dict:
            todo.extend((v, f"{where}.{_short(k)}") for k, v in value.items())
        elif type(value) is list:
            todo.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        else:
            why = _problem(value)
            if why is not None:
                return f"{where}: {why}"
    return f"{path}: cannot be encoded"


def _short(key: Any, limit: int = 40) -> str:
    text = str(key)
    return text if len(text) <= limit else text[:limit] + "..."


def peek_id(value: bytes | None) -> str | None:
    """Best effort: the id of a record that failed validation, for its dead letter.

    Read with pydantic's own parser, which takes what ``parse_request`` took (NaN, integers
    of any size), so a record rejected for one of its values keeps its id.
    """
    if not value:
        return None
    try:
        doc = pydantic_core.from_json(value)
    except ValueError:
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
    status = error.status if type(error.status) is int and _problem(error.status) is None else None
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
