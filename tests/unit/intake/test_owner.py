"""An answer whose partition went to another worker during its call is left to the new owner,
which publishes it from the idempotency store: one output, one upstream call (owner.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streams.cache.responses import ResponseCache
from streams.config import load_settings
from streams.contract import Completion, Request
from streams.intake.owner import Ownership
from streams.intake.processor import Processor
from streams.metrics import PipelineMetrics
from tests.fakes.clock import Clock
from tests.fakes.fake_redis import FakeRedis
from tests.fakes.publisher import FakePublisher
from tests.unit.intake.test_processor import FakeDispatcher, rec, run

DOC = {"id": "r1", "input": "a question", "model": "gpt-4o-mini"}


class MovingDispatcher(FakeDispatcher):
    """A dispatcher during whose call a rebalance gives partition 0 of ``req`` to ``to``."""

    def __init__(self, owner: Ownership, to: set[tuple[str, int]]) -> None:
        super().__init__()
        self.owner, self.to = owner, to

    async def dispatch(self, req: Request) -> Completion:
        self.owner.revoked()
        self.owner.assigned(self.to)
        return await super().dispatch(req)


def worker(fake: FakeRedis, owner: Ownership | None, dispatcher: FakeDispatcher,
           **cache: Any) -> tuple[Processor, FakePublisher, PipelineMetrics]:
    s = load_settings(environ={}, cache=cache)
    c = ResponseCache(s, fake, CollectorRegistry(), clock=Clock(1000.0))  # type: ignore[arg-type]
    pub, metrics = FakePublisher(), PipelineMetrics(CollectorRegistry())
    return Processor(s, pub, dispatcher, c, metrics, owner=owner), pub, metrics


def handed_over(metrics: PipelineMetrics) -> float:
    return metrics.handed_over.collect()[0].samples[0].value


async def test_an_answer_whose_partition_moved_is_published_once_by_the_new_owner() -> None:
    fake = FakeRedis()
    old = Ownership(hold_seconds=5)
    old.assigned({("req", 0), ("req", 1)})
    moving = MovingDispatcher(old, {("req", 1)})  # partition 0 goes to the other worker
    proc, pub, metrics = worker(fake, old, moving)
    assert await run(proc, [rec(7, DOC)]) == {7: "handed_over"}
    assert pub.out == [] and moving.calls == ["r1"] and handed_over(metrics) == 1
    # the new owner reads the record again from the committed offset: replayed, not paid
    new_disp = FakeDispatcher()
    new_owner = Ownership(hold_seconds=5)
    new_owner.assigned({("req", 0)})
    new, new_pub, _ = worker(fake, new_owner, new_disp)
    assert await run(new, [rec(7, DOC)]) == {7: "replayed"}
    assert new_disp.calls == [] and [v["output"] for _, _, v in new_pub.out] == ["fresh"]


async def test_an_answer_whose_partition_stays_is_published_here() -> None:
    owner = Ownership(hold_seconds=5)
    owner.assigned({("req", 0)})
    proc, pub, metrics = worker(FakeRedis(), owner, MovingDispatcher(owner, {("req", 0)}))
    assert await run(proc, [rec(7, DOC)]) == {7: "ok"}
    assert len(pub.out) == 1 and handed_over(metrics) == 0


async def test_an_answer_not_kept_in_the_store_is_published_even_if_its_partition_moved() -> None:
    """The new owner could not replay it: it would pay again. Published here, as before."""
    owner = Ownership(hold_seconds=5)
    owner.assigned({("req", 0)})
    proc, pub, metrics = worker(FakeRedis(), owner, MovingDispatcher(owner, set()),
                                max_value_bytes=16)  # too large for the idempotency store
    assert await run(proc, [rec(7, DOC)]) == {7: "ok"}
    assert len(pub.out) == 1 and handed_over(metrics) == 0


async def test_an_answer_during_a_rebalance_waits_for_the_assignment() -> None:
    owner = Ownership(hold_seconds=5)
    owner.assigned({("req", 0)})

    class Revoking(FakeDispatcher):
        async def dispatch(self, req: Request) -> Completion:
            owner.revoked()  # the assignment comes later
            return await super().dispatch(req)

    proc, pub, _ = worker(FakeRedis(), owner, Revoking())
    task = asyncio.create_task(run(proc, [rec(7, DOC)]))
    await asyncio.sleep(0.05)
    assert not task.done() and pub.out == []  # held while the rebalance lasts
    owner.assigned({("req", 1)})
    assert await task == {7: "handed_over"}


async def test_a_rebalance_longer_than_the_hold_publishes_as_before() -> None:
    owner = Ownership(hold_seconds=0.05)
    owner.assigned({("req", 0)})
    owner.revoked()
    assert await owner.keeps("req", 0) is True
    assert await owner.keeps("req", 5) is True  # never a loss: at worst a duplicate


@given(st.sets(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5))),
       st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5)))
def test_keeps_is_membership_of_the_last_assignment(owned: set[tuple[str, int]],
                                                    tp: tuple[str, int]) -> None:
    async def main() -> bool:
        owner = Ownership(hold_seconds=1)
        assert await owner.keeps(*tp)  # nothing assigned yet: everything is ours
        owner.revoked()
        owner.assigned(owned)
        return await owner.keeps(*tp)

    assert asyncio.run(main()) is (tp in owned)
