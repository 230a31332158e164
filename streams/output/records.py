"""Output records: what one request produces (topic, key, value, headers) and the publisher's interface."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from streams.errors import OutputTooLarge

Headers = list[tuple[str, bytes]]


class OutRecord(NamedTuple):
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None = None


class Publisher(Protocol):
    """Where output records go (``KafkaPublisher``; a fake in unit tests)."""

    async def publish(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        """Return once the broker acknowledged the record; retry transient failures inside."""

    async def publish_many(self, records: list[OutRecord]) -> list[OutputTooLarge | None]:
        """``publish`` of each record, sent together; per record None or its size refusal."""
