"""A publisher that keeps what it is given (decoded), refusing records over ``max_bytes``."""

from __future__ import annotations

from typing import Any

import orjson

from streams.errors import OutputTooLarge
from streams.output.records import Headers, OutRecord


class FakePublisher:
    """``out``: (topic, key, decoded value) of every record published; ``headers``: theirs;
    ``batches``: sizes."""

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self.out: list[tuple[str, bytes | None, dict[str, Any]]] = []
        self.max_bytes = max_bytes
        self.batches: list[int] = []
        self.headers: list[Headers | None] = []

    async def publish(self, topic: str, key: bytes | None, value: bytes,
                      headers: Headers | None = None) -> None:
        if len(value) > self.max_bytes:
            raise OutputTooLarge(f"output record of {len(value)} bytes refused")
        self.out.append((topic, key, orjson.loads(value)))
        self.headers.append(headers)

    async def publish_many(self, records: list[OutRecord]) -> list[OutputTooLarge | None]:
        self.batches.append(len(records))
        res: list[OutputTooLarge | None] = []
        for r in records:
            try:
                await self.publish(r.topic, r.key, r.value, r.headers)
                res.append(None)
            except OutputTooLarge as exc:
                res.append(exc)
        return res
