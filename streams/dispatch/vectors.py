"""What an ``/embeddings`` answer must hold, read defensively: one vector per input, matched by ``index``.

Nothing the endpoint sends is trusted: the body must be a JSON object whose ``data`` holds
exactly one item per input, each with an integer ``index`` (every index once) and an
``embedding`` that is a list of finite numbers, or a base64 string of little-endian float32
values when ``encoding_format`` is ``base64``. Anything else is an ``UpstreamBadResponse``
for the whole call. A call's ``usage`` is split across its inputs in proportion to their
estimated tokens (``split_usage``), so the shares add up to the call's count exactly.

Usage::

    vectors = read_vectors(body, len(inputs), endpoint="a", status=200)
    shares = split_usage(call_tokens, [estimate_input_tokens(t) for t in inputs])
"""

from __future__ import annotations

import binascii
import math
from array import array
from typing import Any

from streams.errors import UpstreamBadResponse

Vector = list[float] | str  # floats, or the upstream's base64 string


def read_vectors(body: Any, n: int, *, endpoint: str, status: int) -> list[tuple[Vector, int]]:
    """Each input's vector and its dimensions, in input order; UpstreamBadResponse otherwise."""

    def bad(why: str) -> UpstreamBadResponse:
        return UpstreamBadResponse(f"HTTP {status} embeddings answer {why}", endpoint=endpoint,
                                   status=status)

    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise bad("without a 'data' list")
    if len(data) != n:
        raise bad(f"with {len(data)} vectors for {n} inputs")
    out: list[tuple[Vector, int] | None] = [None] * n
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < n or out[index] is not None:
            raise bad("with a missing, repeated or out-of-range 'index'")
        got = _vector(item.get("embedding"))
        if got is None:
            raise bad(f"with an invalid embedding at index {index}")
        out[index] = got
    return [v for v in out if v is not None]


def _vector(value: Any) -> tuple[Vector, int] | None:
    if isinstance(value, str):
        try:
            raw = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        if not raw or len(raw) % 4:
            return None
        floats = array("f")
        floats.frombytes(raw)
        return (value, len(floats)) if math.isfinite(sum(floats)) else None
    if not isinstance(value, list) or not value:
        return None
    try:
        floats_d = array("d", value)  # C speed; refuses strings, None, objects
    except TypeError:
        return None
    if not math.isfinite(sum(floats_d)):
        return None
    return floats_d.tolist(), len(floats_d)


def split_usage(total: int | None, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder: the shares add up to
    ``total``); all 0 when the total is unknown."""
    if not total or not weights:
        return [0] * len(weights)
    whole = sum(weights) or len(weights)
    scaled = [total * (w if sum(weights) else 1) for w in weights]
    shares = [s // whole for s in scaled]
    left = total - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: -(scaled[i] % whole))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares
