"""The runtime's record path over fake faust: acks go out in offset order, only once finished."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from streams.config import load_settings
from streams.contract import Completion, Request
from streams.intake.finished import Runs, decode, encode
from tests.fakes.fake_faust import TOPIC, events, runtime
from tests.fakes.publisher import FakePublisher
from tests.unit.intake.test_processor import FakeDispatcher


class GatedDispatcher(FakeDispatcher):
    """Answers request ``r{i}`` only once ``open(i)`` was called."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, rid: str) -> asyncio.Event:
        return self.gates.setdefault(rid, asyncio.Event())

    async def dispatch(self, req: Request) -> Completion:
        await self.gate(req.id).wait()
        return await super().dispatch(req)


async def _until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


async def test_acks_follow_offset_order_whatever_order_the_answers_come_in() -> None:
    disp, pub = GatedDispatcher(), FakePublisher()
    rt, app = runtime(load_settings(environ={}, cache={"enabled": False}), pub, disp, cache=False)
    values = [orjson.dumps({"id": f"r{i}", "input": f"q{i}"}) for i in range(4)]
    await rt.submit_batch(events(values))
    acked = app.consumer.acked
    for rid in ("r3", "r1", "r2"):  # answered out of order: the head (offset 0) still runs
        disp.gate(rid).set()
        await _until(lambda: rid in {doc.get("id") for _, _, doc in pub.out})  # noqa: B023
        assert acked == [], "an offset was acked before every earlier one finished"
    disp.gate("r0").set()
    await _until(lambda: len(acked) == 4)
    assert acked == [((TOPIC, 0), off) for off in range(4)]
    assert rt._tracker.describe() == {str((TOPIC, 0)): (0, None, 0)}


async def test_partitions_ack_independently() -> None:
    disp, pub = GatedDispatcher(), FakePublisher()
    rt, app = runtime(load_settings(environ={}, cache={"enabled": False}), pub, disp, cache=False)
    await rt.submit_batch(events([orjson.dumps({"id": "r0", "input": "a"})], partition=0)
                          + events([orjson.dumps({"id": "r1", "input": "b"})], partition=1))
    disp.gate("r1").set()
    await _until(lambda: len(app.consumer.acked) == 1)
    assert app.consumer.acked == [((TOPIC, 1), 0)]  # partition 0's head does not hold it back
    disp.gate("r0").set()
    await _until(lambda: len(app.consumer.acked) == 2)


async def test_offsets_a_commit_names_finished_are_acked_in_order_and_not_redone() -> None:
    disp, pub = GatedDispatcher(), FakePublisher()
    rt, app = runtime(load_settings(environ={}, cache={"enabled": False}), pub, disp, cache=False)
    tp = (TOPIC, 0)
    # the previous owner committed 10 and had finished 11, 12 and 14 (published)
    assert rt.finished.read(tp, 10, encode(10, Runs([(11, 13), (14, 15)]))) == 3
    values = [orjson.dumps({"id": f"r{i}", "input": f"q{i}"}) for i in range(10, 16)]
    await rt.submit_batch(events(values, start=10))
    for i in (13, 15):
        disp.gate(f"r{i}").set()
    await _until(lambda: len(pub.out) == 2)
    assert app.consumer.acked == []  # 10 still runs: nothing passes it
    # the next commit (of 10) still names what is finished above it, ours and the old owner's
    assert decode(rt.finished.written(tp, 10), 10) == Runs([(11, 16)])
    disp.gate("r10").set()
    await _until(lambda: len(app.consumer.acked) == 6)
    assert app.consumer.acked == [(tp, off) for off in range(10, 16)]
    assert sorted(doc["id"] for _, _, doc in pub.out) == ["r10", "r13", "r15"]
    assert sorted(disp.calls) == ["r10", "r13", "r15"]
    assert rt.metrics.skipped_finished.labels(TOPIC)._value.get() == 3
    assert decode(rt.finished.written(tp, 16), 16) == Runs()  # its token alone


async def test_corrupt_or_foreign_metadata_redoes_everything() -> None:
    disp, pub = GatedDispatcher(), FakePublisher()
    rt, app = runtime(load_settings(environ={}, cache={"enabled": False}), pub, disp, cache=False)
    tp = (TOPIC, 0)
    meta = encode(10, Runs([(11, 13)]))
    for bad in (meta[:-4], "some other client's note", encode(9, Runs([(11, 13)]))):
        assert rt.finished.read(tp, 10, bad) == 0
    assert rt.finished.read(tp, 10, "") == 0
    values = [orjson.dumps({"id": f"r{i}", "input": f"q{i}"}) for i in range(10, 13)]
    await rt.submit_batch(events(values, start=10))
    for i in range(10, 13):
        disp.gate(f"r{i}").set()
    await _until(lambda: len(app.consumer.acked) == 3)
    assert sorted(disp.calls) == ["r10", "r11", "r12"]


async def test_without_metadata_commits_carry_none_and_nothing_is_skipped() -> None:
    disp, pub = GatedDispatcher(), FakePublisher()
    settings = load_settings(environ={}, cache={"enabled": False},
                             kafka={"commit_metadata_max_bytes": 0})
    rt, app = runtime(settings, pub, disp, cache=False)
    tp = (TOPIC, 0)
    assert rt.finished.read(tp, 10, encode(10, Runs([(11, 13)]))) == 0
    await rt.submit_batch(events([orjson.dumps({"id": "r11", "input": "q"})], start=11))
    disp.gate("r11").set()
    await _until(lambda: len(pub.out) == 1)
    assert rt.finished.written(tp, 10) == ""


class StrayCancel(FakeDispatcher):
    """Raises CancelledError for ``stray`` although nobody cancelled the task (a bug below)."""

    async def dispatch(self, req: Request) -> Completion:
        await asyncio.sleep(0.01)
        if req.id == "stray":
            raise asyncio.CancelledError()
        return await super().dispatch(req)


async def test_a_stray_cancellation_dead_letters_its_record_and_never_stalls_the_partition() -> None:
    # A CancelledError nobody asked for (not a stop) used to end the batch's task with its
    # records still tracked: no task would ever finish them, a redelivery bound to them
    # instead of starting them again, and the partition never committed past them.
    disp, pub = StrayCancel(), FakePublisher()
    rt, app = runtime(load_settings(environ={}, cache={"enabled": False}), pub, disp, cache=False)
    ids = ["a", "stray", "b", "c"]
    await rt.submit_batch(events([orjson.dumps({"id": i, "input": f"q {i}"}) for i in ids]))
    await _until(lambda: len(app.consumer.acked) == 4)
    assert app.consumer.acked == [((TOPIC, 0), off) for off in range(4)]
    by_id = {doc.get("id"): (topic, doc) for topic, _, doc in pub.out}
    assert sorted(by_id) == sorted(ids) and len(pub.out) == 4  # one output each
    topic, letter = by_id["stray"]
    assert letter["error"]["type"] == "internal"
    assert rt._tracker.describe() == {str((TOPIC, 0)): (0, None, 0)}


async def test_a_stop_still_leaves_unfinished_records_for_redelivery() -> None:
    disp, pub = GatedDispatcher(), FakePublisher()
    rt, app = runtime(load_settings(environ={}, cache={"enabled": False}), pub, disp, cache=False)
    await rt.submit_batch(events([orjson.dumps({"id": "r0", "input": "q"})]))
    await _until(lambda: bool(rt._tasks))
    rt._stopping = True
    for task in list(rt._tasks):
        task.cancel()
    await asyncio.sleep(0.05)
    assert pub.out == [] and app.consumer.acked == []  # not answered, not acked: redelivered


async def test_a_stray_cancellation_in_the_batch_path_still_gives_every_record_one_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disp, pub = FakeDispatcher(), FakePublisher()
    rt, app = runtime(load_settings(environ={}), pub, disp)
    processor = rt._processor
    assert processor is not None
    cache = processor._cache
    assert cache is not None

    async def prefetch(*_: object) -> None:
        raise asyncio.CancelledError()  # from below, nobody cancelled the batch

    monkeypatch.setattr(cache, "prefetch", prefetch)
    await rt.submit_batch(events([orjson.dumps({"id": f"r{i}", "input": f"q{i}"}) for i in range(3)]))
    await _until(lambda: len(app.consumer.acked) == 3)
    assert sorted(doc["id"] for _, _, doc in pub.out) == ["r0", "r1", "r2"]


async def test_a_stray_cancellation_escaping_the_processor_dead_letters_what_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disp, pub = FakeDispatcher(), FakePublisher()
    rt, app = runtime(load_settings(environ={}, cache={"enabled": False}), pub, disp, cache=False)
    processor = rt._processor
    assert processor is not None

    async def process_batch(*_: object) -> None:
        raise asyncio.CancelledError()

    monkeypatch.setattr(processor, "process_batch", process_batch)
    await rt.submit_batch(events([orjson.dumps({"id": f"r{i}", "input": f"q{i}"}) for i in range(2)]))
    await _until(lambda: len(app.consumer.acked) == 2)
    assert [doc["error"]["type"] for _, _, doc in pub.out] == ["internal", "internal"]


class _Marks:
    """What the runtime asks ``marks.py`` to mark (Redis itself: test_published_marks.py)."""

    def __init__(self) -> None:
        self.added: list[tuple[object, str, int, int]] = []

    def add(self, tp: object, token: str, offset: int, floor: int) -> None:
        self.added.append((tp, token, offset, floor))


async def test_each_published_offset_is_marked_under_its_token_and_no_handed_over_one() -> None:
    from streams.intake.processor import Processor
    from tests.unit.intake.test_owner import MovingDispatcher

    settings = load_settings(environ={})
    pub = FakePublisher()
    rt, app = runtime(settings, pub, FakeDispatcher())
    assert rt._processor is not None
    p0, p1 = (TOPIC, 0), (TOPIC, 1)
    rt.owner.assigned({p0, p1})
    # every call meets a rebalance that leaves partition 1 ours and gives 0 to another worker
    rt._processor = Processor(settings, pub, MovingDispatcher(rt.owner, {p1}),
                              rt._processor._cache, rt.metrics, owner=rt.owner)
    marks = _Marks()
    rt.finished.marks = marks  # type: ignore[assignment]
    rt.finished.read(p0, 3, encode(3, Runs(), token="AAAAAAAAAAA"))
    rt.finished.read(p1, 5, "")  # no token of ours: one is drawn
    token = rt.finished.written(p1, 5)[5:16]
    await rt.submit_batch(events([orjson.dumps({"id": "r0", "input": "a"})], partition=0, start=3)
                          + events([orjson.dumps({"id": "r1", "input": "b"})], partition=1,
                                   start=5))
    await _until(lambda: len(app.consumer.acked) == 1 and len(pub.out) == 1)
    assert [doc["id"] for _, _, doc in pub.out] == ["r1"]  # r0's went to partition 0's owner
    assert marks.added == [(p1, token, 5, 5)]
