"""The runtime's record path over fake faust: acks go out in offset order, only once finished."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from streams.config import load_settings
from streams.contract import Completion, Request
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
