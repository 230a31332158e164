"""The embedding part of the wire contract: what a ``kind: "embedding"`` request holds, and its response.

An embedding request has ``input`` (one non-empty string) and optional ``params``
(``dimensions``, ``encoding_format``, ``user``; nothing else); ``messages`` is not allowed.
Its response carries the vector instead of a chat answer: ``kind``, ``embedding`` (a list of
floats, or the upstream's base64 string when ``encoding_format`` is ``base64``),
``dimensions``, ``usage`` (this input's share of its call's tokens) and ``batch_size`` (how
many inputs shared the call that computed the vector), beside the usual fields.

``contract.py`` calls in here (``check_embedding`` from the request's validator,
``embedding_record`` from ``response_record``), so this module imports it only for types.

Usage::

    check_embedding(req.input, req.messages, req.params)    # raises ValueError
    check_embedding_params(pipeline_params)                  # raises ValueError
    value = embedding_record(req, completion, latency_ms=12)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from streams.contract import Completion, Request

EMBEDDING_PARAMS = frozenset({"dimensions", "encoding_format", "user"})
ENCODINGS = ("float", "base64")
MAX_DIMENSIONS = 65_536


def check_embedding(input_text: str | None, messages: object, params: Mapping[str, Any]) -> None:
    """Raise ValueError (naming the field) unless this is a valid embedding request."""
    if messages is not None:
        raise ValueError("an embedding request has 'input', not 'messages'")
    if not input_text:
        raise ValueError("an embedding request needs a non-empty 'input'")
    check_embedding_params(params)


def check_embedding_params(params: Mapping[str, Any]) -> None:
    """Raise ValueError (naming the parameter) unless ``params`` suit an embedding request
    (also a pipeline's ``params`` with ``output.format: embedding``)."""
    extra = sorted(set(params) - EMBEDDING_PARAMS)
    if extra:
        raise ValueError(f"params {extra} not allowed for an embedding request "
                         f"(only {sorted(EMBEDDING_PARAMS)})")
    dims = params.get("dimensions")
    if dims is not None and (type(dims) is not int or not 1 <= dims <= MAX_DIMENSIONS):
        raise ValueError(f"params.dimensions must be an integer from 1 to {MAX_DIMENSIONS}")
    encoding = params.get("encoding_format")
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError("params.encoding_format must be 'float' or 'base64'")
    user = params.get("user")
    if user is not None and not isinstance(user, str):
        raise ValueError("params.user must be a string")


def estimate_input_tokens(text: str) -> int:
    """Offline estimate of one input's tokens (~4 characters each, at least 1), for tpm."""
    return max(1, (len(text) + 3) // 4)


def embedding_body(vector: list[float] | str, dimensions: int, tokens: int, batch_size: int
                   ) -> dict[str, Any]:
    """What one input's answer is kept as (in a ``Completion``, in the cache)."""
    return {
        "object": "embedding",
        "embedding": vector,
        "dimensions": dimensions,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "batch_size": batch_size,
    }


def embedding_record(req: Request, comp: Completion, *, latency_ms: int,
                     cost: dict[str, Any] | None = None) -> bytes:
    """The response record of an embedding request (``output`` null, no ``response`` body);
    ``cost`` as on the chat record (``streams/pricing.py``: its share of the call's usage)."""
    body = comp.body
    usage = comp.usage
    return orjson.dumps(
        {
            "id": req.id,
            "status": "ok",
            "kind": "embedding",
            "model": comp.model,
            "endpoint": None if comp.cached else comp.endpoint,
            "output": None,
            "embedding": body.get("embedding"),
            "dimensions": body.get("dimensions"),
            "usage": {"prompt_tokens": usage["prompt_tokens"],
                      "total_tokens": usage["total_tokens"]},
            "cached": comp.cached,
            "attempts": comp.attempts,
            "batch_size": body.get("batch_size"),
            "latency_ms": latency_ms,
            "metadata": req.metadata,
            "cost": cost,
        }
    )
