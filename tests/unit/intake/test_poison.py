"""Issue 12: one output per record whatever its values; no record stalls or cancels another."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from streams.config import load_settings
from streams.contract import Completion, Request
from streams.errors import OutputTooLarge
from streams.intake.processor import InRecord, Processor
from streams.output.records import Headers, OutRecord
from tests.fakes.fake_faust import events, runtime
from tests.fakes.publisher import FakePublisher
from tests.unit.intake.test_processor import BODY, FakeDispatcher, make, rec, run

DLQ = "llm.requests.dlq"
BIG = 2**64 + 1


class SlowDispatcher(FakeDispatcher):
    """Holds the requests whose id is in ``hold`` until ``release`` is set."""

    def __init__(self, hold: set[str]) -> None:
        super().__init__()
        self.hold = hold
        self.release = asyncio.Event()
        self.cancelled: list[str] = []

    async def dispatch(self, req: Request) -> Completion:
        if req.id in self.hold:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(req.id)
                raise
        return await super().dispatch(req)


class FlakyPublisher(FakePublisher):
    """Raises a bug (not a Kafka error) the first time a dead letter is published."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def publish(self, topic: str, key: bytes | None, value: bytes,
                      headers: Headers | None = None) -> None:
        if topic == DLQ and not self.failed:
            self.failed = True
            raise RuntimeError("publisher bug")
        await super().publish(topic, key, value, headers)


def outputs_per_key(pub: FakePublisher) -> dict[bytes | None, list[str]]:
    per: dict[bytes | None, list[str]] = {}
    for topic, key, _ in pub.out:
        per.setdefault(key, []).append(topic)
    return per


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize(("poison", "field"), [
    (b'{"id":"p","input":"x","metadata":{"n":%d}}' % BIG, "metadata.n"),
    (b'{"id":"p","input":"x","cache":{"ttl":%d}}' % BIG, "cache.ttl"),
    (b'{"id":"p","input":"x","deadline":%d}' % BIG, "deadline"),
    (b'{"id":"p","input":"x","metadata":NaN}', "metadata"),
])
async def test_a_poison_value_is_a_validation_dead_letter_and_its_batch_goes_on(
    cache: bool, poison: bytes, field: str
) -> None:
    disp = SlowDispatcher(hold={"slow"})
    proc, pub, _, _, _ = make(cache=cache, dispatcher=disp)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, disp.release.set)
    done = await run(proc, [rec(0, {"id": "slow", "input": "a"}), rec(1, poison),
                            rec(2, {"id": "ok", "input": "b"})])
    assert done == {0: "ok", 1: "dead_letter_validation", 2: "ok"}
    assert disp.cancelled == [] and "p" not in disp.calls  # the poison is never paid for
    letter = next(doc for topic, _, doc in pub.out if topic == DLQ)
    assert letter["error"]["message"].startswith(f"{field}: "), letter["error"]
    assert {k: len(v) for k, v in outputs_per_key(pub).items()} == {b"k0": 1, b"k1": 1, b"k2": 1}


async def test_a_failure_inside_the_error_handler_cancels_no_sibling() -> None:
    disp = SlowDispatcher(hold={"slow"})
    proc, pub, _, _, _ = make(publisher=FlakyPublisher(), dispatcher=disp)
    asyncio.get_running_loop().call_later(0.05, disp.release.set)
    done = await run(proc, [rec(0, {"id": "slow", "input": "a"}), rec(1, b"{not json")])
    assert done == {0: "ok", 1: "dead_letter_validation"}
    assert disp.cancelled == []
    assert outputs_per_key(pub) == {b"k0": ["llm.responses"], b"k1": [DLQ]}


async def test_a_failing_batch_path_gives_each_record_an_internal_dead_letter() -> None:
    class Broken(FakePublisher):
        async def publish_many(self, records: list[OutRecord]) -> list[OutputTooLarge | None]:
            raise RuntimeError("bug in publish_many")

    proc, pub, _, cache, _ = make(publisher=Broken())
    assert cache is not None
    for i in range(3):
        seen = Request.model_validate({"id": f"seen{i}", "input": "q", "model": "gpt-4o-mini"})
        await cache.remember(cache.ref(seen, "req"), b'{"id": "x", "status": "ok"}')
    recs = [rec(i, {"id": f"seen{i}", "input": "q"}) for i in range(3)]
    done = await run(proc, [*recs, rec(3, {"id": "fresh", "input": "z"})])
    assert done == {0: "dead_letter_internal", 1: "dead_letter_internal",
                    2: "dead_letter_internal", 3: "ok"}
    assert all(len(v) == 1 for v in outputs_per_key(pub).values())


async def test_a_done_callback_that_raises_stops_no_other_record() -> None:
    proc, _, _, cache, _ = make()
    assert cache is not None
    for i in range(3):
        seen = Request.model_validate({"id": f"seen{i}", "input": "q", "model": "gpt-4o-mini"})
        await cache.remember(cache.ref(seen, "req"), b'{"id": "x", "status": "ok"}')
    seen: list[int] = []

    def done(r: InRecord, outcome: str) -> None:
        seen.append(r.source.offset)
        if r.source.offset == 0:
            raise RuntimeError("caller bug")

    await proc.process_batch([rec(i, {"id": f"seen{i}", "input": "q"}) for i in range(3)], done)
    assert sorted(seen) == [0, 1, 2]


def _settings(**limits: Any) -> Any:
    return load_settings(environ={}, limits=limits, cache={"enabled": False})


async def _settle(rt: Any) -> None:
    while rt._tasks:
        await asyncio.gather(*list(rt._tasks))


async def test_a_batch_task_failing_unexpectedly_dead_letters_and_finishes_its_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pub = FakePublisher()
    rt, app = runtime(_settings(), pub, FakeDispatcher(), cache=False)
    proc = rt._processor
    assert isinstance(proc, Processor)

    async def dies(recs: list[InRecord], done: Any, fast_done: Any = None) -> None:
        done(recs[0], "ok")  # one finished before the failure
        raise RuntimeError("unexpected")

    monkeypatch.setattr(proc, "process_batch", dies)
    await rt.submit_batch(events([orjson.dumps({"id": f"r{i}", "input": "q"}) for i in range(4)]))
    await _settle(rt)
    assert len(rt._tracker) == 0 and rt._tracker.describe() == {str(("llm.requests", 0)): (0, None, 0)}
    assert [off for _, off in app.consumer.acked] == [0, 1, 2, 3]
    kinds = [doc["error"]["type"] for topic, _, doc in pub.out if topic == DLQ]
    assert kinds == ["internal"] * 3
    assert rt._slots.free == rt.settings.limits.max_inflight + rt.settings.limits.max_queued


async def test_the_tracker_cap_pauses_taking_records_until_the_head_finishes() -> None:
    disp = SlowDispatcher(hold={"r0"})
    pub = FakePublisher()
    rt, app = runtime(_settings(max_inflight=2, max_tracked=4), pub, disp, cache=False)
    evs = events([orjson.dumps({"id": f"r{i}", "input": f"q{i}"}) for i in range(10)])
    submit = asyncio.create_task(rt.submit_batch(evs))
    for _ in range(200):
        await asyncio.sleep(0.005)
        if len(pub.out) == 3:
            break
    assert len(pub.out) == 3  # r1..r3 answered; r0 holds the head of the partition
    assert not submit.done(), "took records beyond limits.max_tracked"
    assert len(rt._tracker) == 4 and app.consumer.acked == []
    # a finished record keeps only what its ack needs
    assert all(e.message.value is None and e.message.key is None for e in evs[:4])
    disp.release.set()
    await submit
    await _settle(rt)
    assert len(pub.out) == 10 and len(rt._tracker) == 0
    assert [off for _, off in app.consumer.acked] == list(range(10))


def test_max_tracked_must_cover_max_inflight() -> None:
    from streams.errors import ConfigError

    with pytest.raises(ConfigError, match="max_tracked"):
        load_settings(environ={}, limits={"max_inflight": 10, "max_tracked": 5})
    assert load_settings(environ={}).limits.max_tracked == 60_000


async def test_one_dead_letter_too_large_even_truncated_falls_back_to_the_minimal_one() -> None:
    proc, pub, _, _, _ = make(publisher=FakePublisher(max_bytes=900))
    value = orjson.dumps({"id": "big", "input": "x", "priority": 99, "pad": "y" * 5000})
    done = await run(proc, [InRecord(rec(0, b"").source, b"k0", value)])
    assert done == {0: "dead_letter_validation"}
    letter = pub.out[0][2]
    assert letter["fallback"] is True and letter["id"] == "big" and letter["error"]["type"] == "validation"


def test_body_constant_is_a_completion() -> None:  # keeps the import of BODY honest
    assert BODY["choices"]


async def test_a_key_the_broker_refuses_still_gets_a_bare_dead_letter() -> None:
    class RefusesTheKey(FakePublisher):
        async def publish(self, topic: str, key: bytes | None, value: bytes,
                          headers: Headers | None = None) -> None:
            if key is not None:
                raise OutputTooLarge(f"record with a key of {len(key)} bytes refused")
            await super().publish(topic, key, value, headers)

    proc, pub, _, _, _ = make(publisher=RefusesTheKey())
    done = await run(proc, [InRecord(rec(0, b"").source, b"k" * 2_000_000, b"{not json")])
    assert done == {0: "dead_letter_validation"}
    (topic, key, letter), = pub.out
    assert topic == DLQ and key is None and letter["fallback"] is True
