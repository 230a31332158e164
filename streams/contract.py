"""The wire contract's request record: its schema, its parsing and validation (JSON, UTF-8).

A request that parses is also one we can write back: every integer in it fits in int64,
every number is finite (``contract_values.py``), ``cache.ttl`` is at most
``cache.max_ttl_seconds`` and ``deadline`` is an epoch-millisecond time (2000-01-01 to
2100-01-01). Anything else is a ``ValidationFailed`` naming the field, so no value can break a
response or a dead letter later. The response and dead-letter records are in
``contract_records.py``; their names are importable from here too.

Usage::

    req = parse_request(record_value, max_bytes=1 << 20, default_model="gpt-4o-mini")
    value = response_record(req, completion, latency_ms=12)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streams.contract_records import (
    MAX_TOKEN_COUNT,
    USAGE_KEYS,
    Completion,
    Source,
    dead_letter_record,
    minimal_dead_letter,
    response_record,
    upstream_usage,
    usage_is_invalid,
)
from streams.contract_values import INT64_MAX, INT64_MIN, unrepresentable
from streams.embedding import check_embedding
from streams.errors import ValidationFailed

__all__ = [
    "DEADLINE_MAX_MS", "DEADLINE_MIN_MS", "DEFAULT_MAX_TTL", "INT64_MAX", "INT64_MIN",
    "MAX_TOKEN_COUNT", "USAGE_KEYS", "CacheControl", "ChatMessages", "Completion", "Message",
    "Params", "Request", "Source", "dead_letter_record", "minimal_dead_letter", "parse_request",
    "peek_id", "response_record", "unrepresentable", "upstream_usage", "usage_is_invalid",
]

ChatMessages = list[dict[str, Any]]  # OpenAI chat messages, as sent upstream
Params = Mapping[str, Any]  # the request's other chat-completion parameters

# Parameters that would change the shape of the exchange: we send them ourselves or
# cannot honour them in a request/response stream.
_RESERVED_PARAMS = frozenset({"model", "messages", "stream"})

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
