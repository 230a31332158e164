"""Cache values: the stored byte format (raw or zlib), cached bodies, and what a read returns.

Values start with a format byte: ``\\x00`` raw orjson bytes, ``\\x01`` zlib of them.

Usage::

    value = encode_value(orjson.dumps(body), compress_min_bytes=1024)
    body = decode_body(value)                 # None: unknown format or corrupt
    comp = cached_completion(body, "gpt-4o")  # someone else's answer, as a hit reports it
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

from streams.contract import Completion
from streams.redis_guard import _Down

RAW = b"\x00"
ZLIB = b"\x01"

Body = dict[str, Any]


Read = bytes | None | _Down  # _Down: Redis did not answer, distinct from a None (missing key)


def encode_value(data: bytes, compress_min_bytes: int) -> bytes:
    """Format byte + payload; zlib only when it is over the threshold and actually smaller."""
    if len(data) > compress_min_bytes:
        packed = zlib.compress(data, 6)
        if len(packed) < len(data):
            return ZLIB + packed
    return RAW + data


def decode_value(raw: bytes) -> bytes | memoryview | None:
    """The payload of an encoded value, or None for an unknown format or corrupt data."""
    marker = raw[:1]
    if marker == RAW:
        return memoryview(raw)[1:]  # no copy: orjson reads memoryviews
    if marker == ZLIB:
        try:
            return zlib.decompress(memoryview(raw)[1:])
        except zlib.error:
            return None
    return None


def decode_body(raw: bytes) -> Body | None:
    """The JSON object of an encoded value, or None."""
    data = decode_value(raw)
    if data is None:
        return None
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def cached_completion(body: Body, model: str) -> Completion:
    """An answer not computed by this caller (a hit, or a coalesced leader's): no endpoint, no attempts."""
    return Completion(model=model, body=body, endpoint=None, attempts=0, cached=True)
