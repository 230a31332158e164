"""The direct-delivery consumer: when it may skip faust's wait_first, the copy's guard, our
isolation level, and a partition held at a batch that cannot be decoded."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import OffsetMetadataTooLargeError
from aiokafka.structs import OffsetAndMetadata
from faust.transport.consumer import Consumer
from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from streams.config import load_settings
from streams.intake import transport as faust_io
from streams.intake.agent import build_app
from streams.intake.runtime import Runtime
from streams.intake.transport import DirectDeliveryConsumer, DirectDeliveryTransport
from streams.intake.unreadable import SafeResults


def test_copied_drain_matches_the_installed_faust() -> None:
    # Our _drain_messages is faust's with one change: a new faust must be reviewed first.
    src = inspect.getsource(Consumer._drain_messages)
    assert hashlib.sha256(src.encode()).hexdigest() == faust_io.UPSTREAM_DRAIN_SHA256


class _Flag:
    def __init__(self, value: bool) -> None:
        self.value = value

    def is_set(self) -> bool:
        return self.value

    def is_active(self) -> bool:
        return self.value


class _Queue:
    def __init__(self, full: bool) -> None:
        self._full = full

    def full(self) -> bool:
        return self._full


def _consumer(*, suspended: bool = False, active: bool = True,
              queues: list[bool] | None = None) -> Any:
    chans = [SimpleNamespace(queue=_Queue(f)) for f in ([False] if queues is None else queues)]
    index = {"tp": chans} if queues != [] else {}
    fake = SimpleNamespace(
        suspend_flow=_Flag(suspended),
        app=SimpleNamespace(flow_control=_Flag(active), topics=SimpleNamespace(_tp_index=index)),
    )
    return fake


@pytest.mark.parametrize(
    ("state", "direct"),
    [
        ({}, True),
        ({"queues": [False, False]}, True),
        ({"suspended": True}, False),  # a rebalance began: faust's path can abandon delivery
        ({"active": False}, False),  # flow control holds deliveries (rebalancing)
        ({"queues": [False, True]}, False),  # a full buffer would block the delivery
        ({"queues": []}, False),  # a partition the conductor does not know
    ],
)
def test_direct_only_when_the_delivery_cannot_block(state: dict[str, Any], direct: bool) -> None:
    fake = _consumer(**state)
    assert DirectDeliveryConsumer._can_deliver_now(fake, "tp") is direct


def test_the_worker_app_uses_the_direct_transport() -> None:
    settings = load_settings(environ={})
    app = build_app(settings, Runtime(settings))
    assert isinstance(app.transport, DirectDeliveryTransport)
    assert app.transport.Consumer is DirectDeliveryConsumer


class _FakeAiokafka:
    """aiokafka's consumer as far as our commit and seek use it."""

    def __init__(self, refuse_metadata: bool = False,
                 committed: dict[Any, OffsetAndMetadata] | None = None) -> None:
        self.commits: list[dict[Any, OffsetAndMetadata]] = []
        self.refuse_metadata = refuse_metadata
        self.seeks: list[tuple[Any, int]] = []
        self._committed = committed or {}
        self._subscription = SimpleNamespace(assigned_partitions=lambda: set(self._committed))
        self._coordinator = SimpleNamespace(fetch_committed_offsets=self._fetch)
        self._fetcher = SimpleNamespace(seek_to=lambda tp, off: self.seeks.append((tp, off)))

    async def commit(self, offsets: dict[Any, OffsetAndMetadata]) -> None:
        if self.refuse_metadata and any(o.metadata for o in offsets.values()):
            raise OffsetMetadataTooLargeError()
        self.commits.append(dict(offsets))

    async def _fetch(self, partitions: set[Any]) -> dict[Any, OffsetAndMetadata]:
        return {tp: c for tp, c in self._committed.items() if tp in partitions and c.offset != -1}


class _Hook:
    def __init__(self) -> None:
        self.read_back: list[tuple[Any, int | None, str | None]] = []

    def written(self, tp: Any, offset: int) -> str:
        return f"m{tp.partition}@{offset}"

    async def read_all(self, found: dict[Any, tuple[int | None, str]]) -> None:
        self.read_back += [(tp, offset, metadata) for tp, (offset, metadata) in found.items()]


def _thread(fake: _FakeAiokafka, assigned: set[Any], hook: _Hook | None = None) -> Any:
    thread = object.__new__(faust_io._ConsumerThread)
    thread._consumer = fake
    thread.tp_last_committed_at = {}
    thread.assignment = lambda: assigned
    thread.transport = SimpleNamespace(commit_metadata=hook)

    async def call_thread(fun: Any, *args: Any) -> Any:  # the consumer thread, inline
        return await fun(*args)

    thread.call_thread = call_thread
    return thread


async def test_a_commit_of_only_revoked_partitions_is_skipped_not_a_crash() -> None:
    # faust would hand aiokafka an empty dict (ValueError, the worker crashes).
    mine, gone = TP("t", 0), TP("t", 1)
    fake = _FakeAiokafka()
    thread = _thread(fake, {mine})
    assert await thread._commit({gone: 5}) is False
    assert fake.commits == []
    assert await thread._commit({mine: 7, gone: 5}) is True
    assert fake.commits == [{mine: OffsetAndMetadata(7, "")}]


async def test_each_commit_carries_the_metadata_made_on_the_event_loop() -> None:
    a, b = TP("t", 0), TP("t", 1)
    fake = _FakeAiokafka()
    thread = _thread(fake, {a, b}, _Hook())
    assert await thread.commit({a: 7, b: 9}) is True
    assert fake.commits == [{a: OffsetAndMetadata(7, "m0@7"), b: OffsetAndMetadata(9, "m1@9")}]


async def test_metadata_the_broker_refuses_as_too_large_is_dropped_for_good() -> None:
    a = TP("t", 0)
    fake = _FakeAiokafka(refuse_metadata=True)
    thread = _thread(fake, {a}, _Hook())
    assert await thread.commit({a: 7}) is True  # committed without it, no crash
    assert await thread.commit({a: 8}) is True
    assert fake.commits == [{a: OffsetAndMetadata(7, "")}, {a: OffsetAndMetadata(8, "")}]


async def test_the_seek_to_committed_offsets_hands_back_each_commits_metadata() -> None:
    a, b, c = TP("t", 0), TP("t", 1), TP("t", 2)
    fake = _FakeAiokafka(committed={a: OffsetAndMetadata(40, "meta"), b: OffsetAndMetadata(0, ""),
                                    c: OffsetAndMetadata(-1, "")})
    hook = _Hook()
    thread = _thread(fake, {a, b, c}, hook)
    assert await thread.seek_to_committed() == {a: 40, b: 0, c: None}
    assert fake.seeks == [(a, 40)]  # as aiokafka: no seek without a commit, nor to 0
    assert sorted(hook.read_back) == [(a, 40, "meta"), (b, 0, ""), (c, None, "")]


def test_copied_commit_and_seek_match_the_installed_faust_and_aiokafka() -> None:
    # _ConsumerThread redoes these two with metadata: a new faust or aiokafka is reviewed first.
    from aiokafka import AIOKafkaConsumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    for fun, digest in ((AIOKafkaConsumerThread._commit, faust_io.UPSTREAM_COMMIT_SHA256),
                        (AIOKafkaConsumer.seek_to_committed, faust_io.UPSTREAM_SEEK_SHA256)):
        assert hashlib.sha256(inspect.getsource(fun).encode()).hexdigest() == digest, fun


@pytest.mark.parametrize("level", ["read_committed", "read_uncommitted"])
async def test_the_worker_consumer_reads_with_the_configured_isolation(level: str) -> None:
    # faust itself hard-codes read_uncommitted outside transactions
    settings = load_settings(environ={}, kafka={"isolation_level": level, "compression_type": "lz4"})
    app = build_app(settings, Runtime(settings))
    thread = app.consumer._thread  # type: ignore[attr-defined]
    consumer = thread._create_worker_consumer(app.transport)
    assert consumer._isolation_level == level
    assert thread.unreadable == {}
    assert app.conf.producer_compression_type == "lz4"  # faust's own producer too


class _Records:
    """A partition's records as aiokafka decodes them: ``bad`` raises at that offset."""

    def __init__(self, start: int, end: int, bad: int | None) -> None:
        self.next_fetch_offset = start
        self._end, self._bad = end, bad

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> int:
        off = self.next_fetch_offset
        if off >= self._end:
            raise StopIteration
        if off == self._bad:
            raise ValueError("unsupported codec")
        self.next_fetch_offset = off + 1
        return off


class _State:
    paused = False

    def __init__(self, position: int) -> None:
        self.position = position

    def consumed_to(self, offset: int) -> None:
        self.position = offset


def _fetch_result(tp: Any, records: _Records, state: _State) -> Any:
    from aiokafka.consumer.fetcher import FetchResult

    assignment = SimpleNamespace(active=True, tps={tp}, state_value=lambda _: state)
    return FetchResult(tp, assignment=assignment, partition_records=records, backoff=0)


@given(st.integers(0, 30), st.one_of(st.none(), st.integers(0, 40)), st.integers(1, 50))
def test_a_batch_that_cannot_be_decoded_holds_its_partition(
    end: int, bad: int | None, max_records: int
) -> None:
    from faust.types import TP

    tp = TP("t", 0)
    state = _State(0)
    result = _fetch_result(tp, _Records(0, end, bad), state)
    unreadable: dict[Any, tuple[int, str]] = {}
    results = SafeResults(unreadable, {tp: result})
    got: list[int] = []
    for _ in range(end + 2):  # what fetched_records does: getall, then has_more
        got += results[tp].getall(max_records)
        if not results[tp].has_more():
            break
    readable = end if bad is None or bad >= end else bad
    assert got == list(range(readable))  # every record before the bad batch, in order
    assert state.position == readable  # the next fetch would start at the bad batch
    if readable < end:
        assert unreadable == {tp: (bad, "ValueError: unsupported codec")}
        assert results[tp].has_more()  # held: aiokafka does not fetch it again
        state.position = readable + 5  # a seek (or a rebalance) releases the hold
        assert not results[tp].has_more() and unreadable == {}
    else:
        assert unreadable == {} and not results[tp].has_more()


class _Drain:
    """What ``_drain_messages`` reads of its consumer, for one batch of fetched records; a
    rebalance (revoke, then the seek to the committed offset) may come while it awaits."""

    consumer_stopped_errors = ()

    def __init__(self, read: int, offsets: list[int], *, rebalance_in: str,
                 commit_every: int | None = None) -> None:
        self.tp = TP("req", 0)
        self._read_offset = defaultdict(lambda: None, {self.tp: read})
        self._offsets = offsets
        self._rebalance_in, self._rebalanced = rebalance_in, False
        self._commit_every, self._n_acked = commit_every, 1
        self._stopped = asyncio.Event()
        self.moves = 0
        self.delivered: list[int] = []
        self.diag = SimpleNamespace(set_flag=lambda f: None, unset_flag=lambda f: None)
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda t: True))
        self.suspend_flow = asyncio.Event()
        self.should_stop = False
        self.dropped: list[int] = []
        self.log = SimpleNamespace(dev=lambda fmt, off, *a: self.dropped.append(off),
                                   info=logging.info, exception=logging.exception)
        self.transport = SimpleNamespace(app=SimpleNamespace(should_stop=False))

    def _rebalance(self, where: str, committed: int = 650) -> None:
        if where == self._rebalance_in and not self._rebalanced:
            self._rebalanced = True
            self.moves += 3  # the revoke, and the seek (before and after)
            self._read_offset[self.tp] = committed  # faust's perform_seek

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        for off in self._offsets:
            yield self.tp, SimpleNamespace(offset=off, topic="req", key=None, value=None)
        self._stopped.set()

    async def callback(self, message: Any) -> None:
        self.delivered.append(message.offset)
        await asyncio.sleep(0)
        self._rebalance("delivery")

    async def commit(self) -> None:
        await asyncio.sleep(0)
        self._rebalance("commit")

    def _can_deliver_now(self, tp: Any) -> bool:
        return True

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _add_gap(self, tp: Any, start: int, end: int) -> None:
        raise AssertionError(f"a gap {start}..{end}: no record was skipped")


async def _drain(fake: _Drain) -> None:
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    await DirectDeliveryConsumer._drain_messages(fake, fetcher)  # type: ignore[arg-type]


async def test_a_seek_during_a_delivery_sets_where_to_read_next() -> None:
    # 701 is delivered while a rebalance seeks the partition back to its commit, 650: the
    # records from 650 are fetched again and must be delivered, not dropped as already read
    fake = _Drain(700, [701, 650, 651], rebalance_in="delivery")
    await _drain(fake)
    assert fake.delivered == [701, 650, 651] and fake.dropped == []
    assert fake._read_offset[fake.tp] == 651


async def test_a_record_fetched_before_a_seek_during_the_inline_commit_is_not_delivered() -> None:
    fake = _Drain(700, [701, 650, 651], rebalance_in="commit", commit_every=1)
    await _drain(fake)
    assert fake.delivered == [650, 651] and fake.dropped == []  # 701 comes again after them
    assert fake._read_offset[fake.tp] == 651


async def test_without_a_rebalance_each_record_sets_the_read_offset() -> None:
    fake = _Drain(700, [701, 702], rebalance_in="never", commit_every=1)
    await _drain(fake)
    assert fake.delivered == [701, 702]
    assert fake._read_offset[fake.tp] == 702
