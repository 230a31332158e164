"""Processor.process_batch with fakes: one round trip per batch, one output per record."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from streams.cache.responses import ResponseCache
from streams.config import load_settings
from streams.contract import Completion, Request, Source
from streams.errors import DispatchFailed, UpstreamStatusError
from streams.intake.processor import InRecord, Processor
from streams.metrics import MAX_MODEL_LABELS, PipelineMetrics, configured_models
from tests.fakes.fake_redis import FakeRedis
from tests.fakes.publisher import FakePublisher

BODY = {"id": "x", "choices": [{"message": {"role": "assistant", "content": "fresh"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class FakeDispatcher:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()

    async def dispatch(self, req: Request) -> Completion:
        self.calls.append(req.id)
        if req.id in self.fail:
            err = UpstreamStatusError("HTTP 400: bad", endpoint="a", status=400)
            raise DispatchFailed(err, 1, ["a"])
        return Completion(model=req.model or "m", body=BODY, endpoint="a", attempts=1, endpoints=["a"])


def rec(offset: int, doc: dict[str, Any] | bytes) -> InRecord:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return InRecord(Source("req", 0, offset, 1), f"k{offset}".encode(), value)


def make(cache: bool = True, publisher: FakePublisher | None = None,
         dispatcher: FakeDispatcher | None = None) -> tuple[Processor, FakePublisher, FakeDispatcher,
                                                             ResponseCache | None, FakeRedis]:
    s = load_settings(environ={})
    fake = FakeRedis()
    c = ResponseCache(s, fake, CollectorRegistry()) if cache else None  # type: ignore[arg-type]
    pub = publisher or FakePublisher()
    disp = dispatcher or FakeDispatcher()
    proc = Processor(s, pub, disp, c, PipelineMetrics(CollectorRegistry()))
    return proc, pub, disp, c, fake


async def run(proc: Processor, recs: list[InRecord]) -> dict[int, str]:
    done: dict[int, str] = {}

    def on_done(r: InRecord, outcome: str) -> None:
        assert r.source.offset not in done, "done twice"
        done[r.source.offset] = outcome

    fast = []
    await proc.process_batch(recs, on_done, lambda: fast.append(1))
    assert fast, "fast_done never called"
    return done


async def test_one_batch_serves_hits_replays_misses_and_bad_records() -> None:
    proc, pub, disp, cache, fake = make()
    assert cache is not None
    hot = Request.model_validate({"id": "h0", "input": "hot", "model": "gpt-4o-mini"})
    await cache.store(hot, Completion(model="gpt-4o-mini", body=BODY, endpoint="a", attempts=1))
    seen = Request.model_validate({"id": "seen", "input": "whatever", "model": "gpt-4o-mini"})
    await cache.remember(cache.ref(seen, "req"), b'{"id": "seen", "status": "ok", "replayed": true}')
    fake.round_trips.clear()
    recs = [
        rec(0, {"id": "hit", "input": "hot"}),
        rec(1, {"id": "seen", "input": "whatever"}),
        rec(2, {"id": "miss", "input": "cold"}),
        rec(3, b"{not json"),
        rec(4, {"id": "bad", "input": "x", "priority": 99}),
    ]
    done = await run(proc, recs)
    assert done == {0: "cached", 1: "replayed", 2: "ok", 3: "dead_letter_validation",
                    4: "dead_letter_validation"}
    assert disp.calls == ["miss"]
    assert fake.round_trips["mget"] == 1  # recall + lookup of the whole batch
    assert pub.batches == [2]  # the hit and the replay, sent together
    by_id = {doc.get("id"): (topic, key, doc) for topic, key, doc in pub.out}
    assert by_id["hit"][2]["cached"] is True and by_id["hit"][1] == b"k0"
    assert by_id["seen"][2] == {"id": "seen", "status": "ok", "replayed": True}
    assert by_id["miss"][2]["cached"] is False and by_id["miss"][2]["endpoint"] == "a"
    assert by_id["bad"][0] == "llm.requests.dlq"
    assert sum(1 for t, _, _ in pub.out if t == "llm.requests.dlq") == 2


async def test_identical_misses_in_one_batch_call_upstream_once() -> None:
    proc, pub, disp, _, _ = make()
    done = await run(proc, [rec(i, {"id": f"r{i}", "input": "same"}) for i in range(20)])
    assert len(done) == 20 and len(disp.calls) == 1
    assert sorted(d["cached"] for _, _, d in pub.out) == [False] + [True] * 19


async def test_a_hit_too_large_to_publish_becomes_a_dead_letter() -> None:
    proc, pub, _, cache, _ = make(publisher=FakePublisher(max_bytes=600))
    assert cache is not None
    big = {**BODY, "pad": "x" * 400}
    hot = Request.model_validate({"id": "h0", "input": "hot", "model": "gpt-4o-mini"})
    await cache.store(hot, Completion(model="gpt-4o-mini", body=big, endpoint="a", attempts=1))
    done = await run(proc, [rec(0, {"id": "hit", "input": "hot"})])
    assert list(done) == [0] and done[0].startswith("dead_letter_")
    assert [t for t, _, _ in pub.out] == ["llm.requests.dlq"]
    assert "refused" in pub.out[0][2]["error"]["message"]


async def test_failed_dispatch_and_no_cache_path() -> None:
    proc, pub, disp, _, _ = make(cache=False, dispatcher=FakeDispatcher(fail={"r1"}))
    done = await run(proc, [rec(0, {"id": "r0", "input": "a"}), rec(1, {"id": "r1", "input": "b"})])
    assert done[0] == "ok" and done[1].startswith("dead_letter_")
    assert disp.calls == ["r0", "r1"]


async def test_prefetch_failure_falls_back_to_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug that fails the batch's prefetch for one request: the others are still checked
    # (a redelivery replayed, not paid again), and that one is never dispatched unchecked.
    proc, pub, disp, cache, fake = make()
    assert cache is not None
    seen = Request.model_validate({"id": "r0", "input": "p0", "model": "gpt-4o-mini"})
    await cache.remember(cache.ref(seen, "req"), b'{"id": "r0", "replayed": true}')
    real = cache.prefetch

    async def broken(reqs: list[Request], topics: list[str]) -> list[Any]:
        if any(r.id == "r1" for r in reqs):
            raise RuntimeError("bug")
        return await real(reqs, topics)

    monkeypatch.setattr(cache, "prefetch", broken)
    fake.round_trips.clear()
    done = await run(proc, [rec(i, {"id": f"r{i}", "input": f"p{i}"}) for i in range(3)])
    assert done == {0: "replayed", 1: "dead_letter_internal", 2: "ok"}
    assert disp.calls == ["r2"]
    assert fake.round_trips["mget"] == 1  # the records alone still share one round trip
    (letter,) = [d for t, _, d in pub.out if t == "llm.requests.dlq"]
    assert letter["id"] == "r1" and "RuntimeError: bug" in letter["error"]["message"]


def make_with(**cache: Any) -> tuple[Processor, FakePublisher, FakeDispatcher, ResponseCache]:
    s = load_settings(environ={}, cache=cache)
    c = ResponseCache(s, FakeRedis(), CollectorRegistry())  # type: ignore[arg-type]
    pub, disp = FakePublisher(), FakeDispatcher()
    return Processor(s, pub, disp, c, PipelineMetrics(CollectorRegistry())), pub, disp, c


async def test_an_id_reused_with_other_content_or_tenant_is_answered_afresh() -> None:
    proc, pub, disp, cache = make_with(enabled=False)  # so every answer is a fresh call
    docs = [
        {"id": "job-1", "input": "first", "tenant": "a", "metadata": {"who": "a"}},
        {"id": "job-1", "input": "first", "tenant": "a", "metadata": {"who": "a"}},  # again
        {"id": "job-1", "input": "second", "tenant": "a", "metadata": {"who": "a2"}},
        {"id": "job-1", "input": "first", "tenant": "b", "metadata": {"who": "b"}},
        {"id": "job-1", "input": "first", "tenant": "b", "metadata": {"who": "b"}},  # again
    ]
    outcomes = []
    for i, doc in enumerate(docs):
        outcomes += list((await run(proc, [rec(i, doc)])).values())
    assert outcomes == ["ok", "replayed", "ok", "ok", "replayed"]
    assert len(disp.calls) == 3
    assert [d["metadata"]["who"] for _, _, d in pub.out] == ["a", "a", "a2", "b", "b"]
    conflicts = cache.metrics.conflicts.collect()[0].samples[0].value
    assert conflicts == 1  # tenant b never saw tenant a's record, so no conflict either


async def test_with_the_cache_disabled_a_redelivered_record_is_not_sent_upstream_again() -> None:
    proc, pub, disp, _ = make_with(enabled=False)
    recs = [rec(i, {"id": f"r{i}", "input": "same prompt"}) for i in range(3)]
    assert await run(proc, recs) == {0: "ok", 1: "ok", 2: "ok"}  # no cache: no sharing
    assert await run(proc, recs) == {0: "replayed", 1: "replayed", 2: "replayed"}
    assert len(disp.calls) == 3
    assert pub.out[:3] == pub.out[3:]


class UsageDispatcher(FakeDispatcher):
    """Answers with the given usage, under the request's own model name."""

    def __init__(self, usage: object) -> None:
        super().__init__()
        self.usage = usage

    async def dispatch(self, req: Request) -> Completion:
        body = {**BODY, "usage": self.usage}
        return Completion(model=req.model or "m", body=body, endpoint="a", attempts=1)


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": -2},
    {"prompt_tokens": 1.5, "completion_tokens": 2, "total_tokens": 3.5},
    {"prompt_tokens": True, "completion_tokens": 1, "total_tokens": 2},
    {"prompt_tokens": "12"},
    "lots",
])
async def test_invalid_upstream_usage_gives_one_response_and_counts_nothing(usage: object) -> None:
    proc, pub, _, _, _ = make(dispatcher=UsageDispatcher(usage))
    done = await run(proc, [rec(0, {"id": "u", "input": "x"})])
    assert done == {0: "ok"}
    assert [t for t, _, _ in pub.out] == ["llm.responses"]  # no internal dead letter after it
    assert pub.out[0][2]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0,
                                      "total_tokens": 0}
    counted = [s.value for m in proc._metrics.tokens.collect() for s in m.samples
               if s.name.endswith("_total")]
    assert all(v == 0 for v in counted)


async def test_model_label_is_bounded_whatever_models_requests_invent() -> None:
    registry = CollectorRegistry()
    s = load_settings(environ={})
    metrics = PipelineMetrics(registry, configured_models(s))
    pub = FakePublisher()
    proc = Processor(s, pub, UsageDispatcher(BODY["usage"]), None, metrics)
    n = MAX_MODEL_LABELS + 500
    await run(proc, [rec(i, {"id": f"r{i}", "input": "x", "model": f"made-up-{i}"})
                     for i in range(n)])
    await run(proc, [rec(n, {"id": "d", "input": "x"})])  # the default model: always by name
    models = {labels["model"] for m in registry.collect() if m.name == "llm_streams_tokens"
              for sample in m.samples for labels in [sample.labels]}
    assert len(models) == MAX_MODEL_LABELS + 2  # the first 64, "other", the default model
    assert "other" in models and s.worker.default_model in models
    total = registry.get_sample_value("llm_streams_tokens_total",
                                      {"model": "other", "kind": "prompt"})
    assert total == 500 * 3
