"""A partition whose fetched bytes cannot be decoded is held, not fatal (``transport.py``).

aiokafka decodes lazily while ``getmany`` iterates; an error there would lose the records of
the partitions already drained and kill the worker. ``SafeResults`` wraps the fetcher's buffer
so each partition's result stops at its bad batch: the records before it are delivered, the
partition is not fetched again until a seek or a rebalance, and ``unreadable_partitions``
names it (``/readyz``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from aiokafka.consumer.fetcher import FetchResult
from faust.types import TP

log = logging.getLogger("streams.kafka")


class SafeResults(OrderedDict[Any, Any]):
    """The fetcher's buffer of fetched results, giving each result a ``_SafeGetall``."""

    def __init__(self, unreadable: dict[TP, tuple[int, str]], results: Mapping[Any, Any]) -> None:
        super().__init__()
        self._unreadable = unreadable
        for tp, result in results.items():
            self[tp] = result

    def __setitem__(self, tp: Any, result: Any) -> None:
        if type(result) is FetchResult:
            result.getall = _SafeGetall(result, self._unreadable)
        super().__setitem__(tp, result)


class _SafeGetall:
    """aiokafka's ``FetchResult.getall`` that stops at a batch it cannot decode.

    aiokafka decodes (decompresses, checks CRCs) lazily while ``fetched_records`` iterates
    every partition's result; an error there escapes ``getmany`` after the records of the
    partitions already drained were taken (their positions advanced), so they would be
    lost, and faust then kills the worker. Here the records before the bad batch are
    returned, the position stops at the bad batch, and the result stays in the fetcher's
    buffer, so aiokafka does not fetch that partition again until a seek or a rebalance.
    """

    def __init__(self, result: FetchResult, unreadable: dict[TP, tuple[int, str]]) -> None:
        self._result = result
        self._unreadable = unreadable
        self._held_at: int | None = None

    def __call__(self, max_records: int | None = None) -> list[Any]:
        result = self._result
        if self._held_at is not None:
            return []
        tp = result._topic_partition
        if not result.check_assignment(tp) or not result.has_more():
            return []
        records = result._partition_records
        out: list[Any] = []
        try:
            for msg in records:
                out.append(msg)
                if max_records is not None and len(out) >= max_records:
                    result._update_position()
                    return out
        except Exception as exc:  # whatever decoding these bytes raised: this partition's problem
            result._update_position()  # past what we return, up to the bad batch
            self._hold(tp, records.next_fetch_offset, exc)
            return out
        result._update_position()
        result._partition_records = None
        return out

    def _hold(self, tp: Any, offset: int, exc: Exception) -> None:
        result = self._result
        self._held_at = offset
        reason = f"{type(exc).__name__}: {exc}"
        self._unreadable[tp] = (offset, reason)
        log.error("partition %s[%d] cannot be read at offset %d (%s); holding it, the other "
                  "partitions go on (a restart or rebalance tries again)",
                  tp.topic, tp.partition, offset, reason)
        assignment = result._assignment

        def held() -> bool:  # until a rebalance or a seek moves the partition elsewhere
            still = (assignment.active and tp in assignment.tps
                     and assignment.state_value(tp).position == offset)
            if not still:
                self._unreadable.pop(tp, None)
            return bool(still)

        result.has_more = held


def unreadable_partitions(app: Any) -> dict[TP, tuple[int, str]]:
    """Partitions held because a batch cannot be decoded: tp -> (offset, reason)."""
    consumer = getattr(app, "_consumer", None)
    thread = getattr(consumer, "_thread", None) if consumer is not None else None
    return dict(getattr(thread, "unreadable", None) or {})
