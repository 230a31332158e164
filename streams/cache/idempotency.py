"""The idempotency store: the exact output record of each request id, so a redelivery republishes it.

Values have a kind byte first (``r`` response, ``d`` dead letter), then the 16-byte
fingerprint of the request's content (``keys.fingerprint``), then an encoded record
(``codec``). A record is republished only for a request of the same content. The same id
with other content is a conflict: answered afresh (its record then replaces the old one),
counted, never served the other request's record. Its reads and writes are tried even while
the cache's circuit is open, and again after an outage error (``force``): one slow command
under load would otherwise skip the records of a whole second and let their redeliveries call
the upstream again. Only a read Redis never answered lets a request go on unchecked (the
documented outage behaviour: answered, counted in ``..._idempotency_unchecked_total``, logged).

Usage::

    ref = idem.ref(req, source_topic)
    (raw,) = await store.read_many([ref.key], force=True)
    if (got := idem.check(raw, ref)) is not None: ...   # republish got.value
    await idem.remember(ref, response_record_bytes)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, NamedTuple

from streams.cache.codec import Read, decode_value, encode_value
from streams.cache.keys import FINGERPRINT_SIZE, fingerprint, idem_key
from streams.cache.store import RedisStore
from streams.config import Settings
from streams.contract import Request
from streams.logs import LogThrottle, request_extra
from streams.redis_guard import DOWN

log = logging.getLogger("streams.cache")

Kind = Literal["response", "dead_letter"]
_KIND_BYTE: dict[str, bytes] = {"response": b"r", "dead_letter": b"d"}
_BYTE_KIND: dict[bytes, Kind] = {b"r": "response", b"d": "dead_letter"}
_HEAD = 1 + FINGERPRINT_SIZE  # kind byte, fingerprint


class Recalled(NamedTuple):
    """An output record remembered for a request id."""

    kind: Kind
    value: bytes


class IdemRef(NamedTuple):
    """Where one request's output is remembered, and what it must match (``IdempotencyStore.ref``)."""

    key: str  # the Redis key: tenant and id
    fingerprint: bytes  # of the request's whole content and source topic
    ttl: int  # seconds to remember its output
    request_id: str


def _recalled(raw: Read, ref: IdemRef) -> Recalled | Literal[False] | None:
    """The record remembered for ``ref``; False if the id holds another content's record."""
    if not isinstance(raw, bytes):
        return None
    kind = _BYTE_KIND.get(raw[:1])
    if kind is None or len(raw) < _HEAD:
        return None
    if raw[1:_HEAD] != ref.fingerprint:
        return False
    payload = decode_value(raw[_HEAD:])
    return None if payload is None else Recalled(kind, bytes(payload))


class IdempotencyStore:
    """Remembers output records by tenant and request id (works with the cache disabled)."""

    def __init__(self, settings: Settings, store: RedisStore, clock: Callable[[], float]) -> None:
        self._cfg = settings.cache
        self._store = store
        self._conflicts = LogThrottle(settings.cache.error_log_interval_seconds, clock)
        self._unchecked = LogThrottle(settings.cache.error_log_interval_seconds, clock)

    def ref(self, req: Request, topic: str) -> IdemRef:
        """Where ``req`` (read from ``topic``) is remembered: its tenant and id, its content.

        A ``no_store`` request is remembered only as long as a redelivery can come
        (``cache.no_store_idempotency_ttl_seconds``), others ``cache.idempotency_ttl_seconds``.
        """
        cfg = self._cfg
        ttl = cfg.idempotency_ttl_seconds
        if req.cache.no_store:
            ttl = min(ttl, cfg.no_store_idempotency_ttl_seconds)
        return IdemRef(self._store.rkey(idem_key(req.tenant, req.id)), fingerprint(req, topic), ttl, req.id)

    async def remember(
        self, ref: IdemRef, value: bytes, kind: Kind = "response", ttl: int | None = None
    ) -> bool:
        """Keep the exact output record so a redelivery republishes it without upstream; True
        when it is kept.

        It replaces whatever the id held (the latest content of an id wins).
        """
        encoded = (_KIND_BYTE[kind] + ref.fingerprint
                   + encode_value(value, self._cfg.compress_min_bytes))
        if len(encoded) > self._cfg.max_value_bytes:
            self._store.metrics.skipped.labels("too_large").inc()
            return False
        return await self._store.write(ref.key, encoded, ttl or ref.ttl, "idempotency", force=True)

    def note_replay(self, kind: Kind = "response") -> None:
        """Count a redelivered id answered from the store (the caller republishes)."""
        self._store.metrics.replays.labels(kind).inc()

    def check(self, raw: Read, ref: IdemRef) -> Recalled | None:
        """The record ``raw`` holds for ``ref``, or None; a conflict, or a read Redis did not
        answer (``DOWN``, after its retries), is counted and logged."""
        if raw is DOWN:
            self._store.metrics.unchecked.inc()
            if count := self._unchecked.due():
                log.warning(
                    "redis did not answer the idempotency store after %d tries: requests "
                    "answered without their check (a redelivered one may be answered again; "
                    "%d such since last report)", self._cfg.redis_attempts, count,
                    extra=request_extra(ref.request_id),
                )
            return None
        got = _recalled(raw, ref)
        if got is not False:
            return got
        self._store.metrics.conflicts.inc()
        if count := self._conflicts.due():
            log.warning(
                "request id reused with other content: answered afresh, not replayed "
                "(%d such since last report)", count, extra=request_extra(ref.request_id),
            )
        return None
