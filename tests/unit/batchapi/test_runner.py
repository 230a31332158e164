"""A cut from its requests to their outputs, against the mock's Batch API in process.

The real client, cache (on a fake Redis) and runner; a fake job store and publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from mockllm.batches import BatchApi
from mockllm.server import MockBehaviour, MockLLM
from streams.batchapi.client import BatchApiError, BatchClient
from streams.batchapi.jobs import Cut, Part
from streams.batchapi.metrics import BatchMetrics
from streams.batchapi.parking import ParkedRecord
from streams.batchapi.partition import ActiveCut, Held, PartitionJobs
from streams.batchapi.policy import BatchPolicy
from streams.batchapi.runner import META_KEY, CutRunner, RunnerDeps
from streams.cache.responses import ResponseCache
from streams.config import load_settings
from streams.contract import Request, Source
from streams.metrics import PipelineMetrics
from streams.output.deadletters import DeadLetters
from streams.pricing import Pricing
from tests.fakes.fake_redis import FakeRedis
from tests.fakes.publisher import FakePublisher


class FakeStore:
    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []

    async def save(self, cut: Cut) -> None:
        self.saved.append(orjson.loads(cut.encode()))

    async def drop(self, cut: Cut) -> None:
        pass


class Rig:
    def __init__(self, url: str, session: aiohttp.ClientSession,
                 pricing: dict[str, Any] | None = None, cache: dict[str, Any] | None = None) -> None:
        self.settings = load_settings(environ={}, endpoints=[
            {"name": "b", "url": f"{url}/v1", "batch_api": True}],
            batch_api={"enabled": True, "poll_seconds": 0.05}, pricing=pricing or {}, cache=cache or {})
        reg = CollectorRegistry()
        self.metrics = BatchMetrics(reg)
        self.cache = ResponseCache(self.settings, FakeRedis(), reg)  # type: ignore[arg-type]
        self.publisher = FakePublisher()
        self.store = FakeStore()
        self.normal: list[tuple[list[int], str]] = []
        self.settle_normal = True
        self.client = BatchClient(session)
        deps = RunnerDeps(self.settings, BatchPolicy(self.settings, self.metrics), self.client,
                          self.store, self.cache, self.publisher,  # type: ignore[arg-type]
                          DeadLetters(self.settings, self.publisher, PipelineMetrics(reg)),
                          self.metrics, pricing=Pricing(self.settings.pricing))
        self.runner = CutRunner(deps)
        self.pj = PartitionJobs(0, [], self._start, self._normal, 100, 1000, 0)

    def _start(self, pj: PartitionJobs, active: ActiveCut) -> asyncio.Task[None]:
        raise AssertionError("the test runs cuts itself")

    def _normal(self, pj: PartitionJobs, helds: list[Held], reason: str) -> None:
        self.normal.append(([h.rec.offset for h in helds], reason))
        for h in helds:  # answered by the normal path at once (unless a test holds it)
            if self.settle_normal:
                pj.settle(h.rec.offset)

    def cut(self, prompts: list[str], parts: list[Part] | None = None) -> ActiveCut:
        helds = []
        for i, prompt in enumerate(prompts):
            req = Request(id=f"r{i}", input=prompt, model="m", priority=8)
            rec = ParkedRecord(Source("req", 1, 100 + i, 0), b"k", orjson.dumps(
                req.model_dump(mode="json")), i, 0.0)
            helds.append(Held(rec, req))
            self.pj.feed(helds[-1])
        self.pj.pending.clear()
        cut = Cut(0, 0, len(prompts), len(prompts), parts=parts or [])
        return ActiveCut(cut, helds)

    def cut_at(self, start: int, items: list[tuple[str, str]], **over: Any) -> ActiveCut:
        """A cut of requests (id, prompt) at parked offsets from ``start`` on; ``over``: more
        fields of every request (``cache={"no_cache": True}``)."""
        helds = []
        for i, (rid, prompt) in enumerate(items):
            req = Request(id=rid, input=prompt, model="m", priority=8, **over)
            rec = ParkedRecord(Source("req", 1, 100 + start + i, 0), b"k", orjson.dumps(
                req.model_dump(mode="json")), start + i, 0.0)
            helds.append(Held(rec, req))
            self.pj.feed(helds[-1])
        self.pj.pending.clear()
        return ActiveCut(Cut(0, start, start + len(items), len(items)), helds)

    async def running(self, api: BatchApi, items: list[tuple[str, str]], **over: Any
                      ) -> tuple[ActiveCut, asyncio.Task[None]]:
        """A first cut of ``items`` at offset 0, run until its batch is created."""
        first = self.cut_at(0, items, **over)
        task = asyncio.create_task(self.runner.run(self.pj, first))
        while not api.stats["batches_created"]:
            await asyncio.sleep(0.01)
        return first, task

    def answers(self) -> dict[str, dict[str, Any]]:
        return {v["id"]: v for _, _, v in self.publisher.out}


@pytest.fixture
async def rig() -> AsyncIterator[tuple[Rig, MockLLM, BatchApi]]:
    async with rig_of() as got:
        yield got


@contextlib.asynccontextmanager
async def rig_of(**settings: Any) -> AsyncIterator[tuple[Rig, MockLLM, BatchApi]]:
    """A rig on the mock's Batch API in process; ``settings``: Rig's pricing or cache."""
    mock = MockLLM(MockBehaviour(batch_delay_seconds=0.1), rng=random.Random(3))
    server = TestServer(mock.app())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Rig(str(server.make_url("")).rstrip("/"), session, **settings), mock, mock.batches
    finally:
        await server.close()


async def test_identical_requests_share_a_line_and_every_one_is_answered(rig: Any) -> None:
    r, mock, api = rig
    active = r.cut(["a", "b", "a", "c", "a"])
    await r.runner.run(r.pj, active)
    assert api.stats["batches_created"] == 1 and api.stats["lines_answered"] == 3
    answers = r.answers()
    assert set(answers) == {f"r{i}" for i in range(5)} and len(r.publisher.out) == 5
    assert answers["r0"]["output"] == answers["r2"]["output"] != answers["r1"]["output"]
    # one pays the line; the others are published as a coalesced answer is
    assert [answers[f"r{i}"]["cached"] for i in range(5)] == [False, False, True, False, True]
    job = answers["r4"]["batch_job"]
    assert job["id"].startswith("batch-") and job["submitted_at"].endswith("Z")
    assert r.pj.commit_offset() == 5 and active.cut.done
    assert mock.stats.calls == 0  # no synchronous call
    states = [[p["state"] for p in s["parts"]] for s in r.store.saved]
    assert states[0] == ["building"] and states[-1] == ["completed"] and r.store.saved[-1]["done"]
    found = await r.cache.prefetch([active.held[1].req], ["requests"])
    assert found[0].hit is not None  # job answers are cached


async def test_failed_lines_and_failed_jobs_take_the_normal_path(rig: Any) -> None:
    r, mock, _ = rig
    mock.behaviour.batch_error_rate = 1.0
    await r.runner.run(r.pj, r.cut(["a", "b"]))
    assert r.normal == [([0, 1], "line_error")] and r.publisher.out == []
    mock.behaviour.batch_error_rate = 0.0
    mock.behaviour.batch_outcome = "expired"
    r.normal.clear()
    r.pj.handled.clear()
    r.pj.open.clear()
    await r.runner.run(r.pj, r.cut(["x", "y"]))
    assert r.normal == [([0, 1], "job_failed")]


async def test_a_request_answered_by_a_normal_call_gets_no_second_output(rig: Any) -> None:
    r, mock, api = rig
    active = r.cut(["a", "b", "c", "d"])
    r.pj.handled.add(3)  # its deadline came before the job was built: not in it
    r.pj.settle(3)  # (the normal path answered it)
    mock.behaviour.batch_delay_seconds = 0.5
    task = asyncio.create_task(r.runner.run(r.pj, active))
    while not api.stats["batches_created"]:
        await asyncio.sleep(0.01)
    r.pj.handled.add(1)  # its deadline came while the job ran
    r.pj.settle(1)
    await task
    assert set(r.answers()) == {"r0", "r2"} and api.stats["lines_answered"] == 3
    assert r.metrics.late_dropped._value.get() == 1


async def test_a_request_parked_again_while_its_job_runs_rides_on_its_line(rig: Any) -> None:
    # Parked twice (a producer's retry, or parked again after a crash before the source's
    # commit), in two cuts: one line is paid, both deliveries are answered from it. Before,
    # the second cut paid a line of its own.
    r, mock, api = rig
    mock.behaviour.batch_delay_seconds = 0.3
    first, task = await r.running(api, [("r0", "a")])
    second = r.cut_at(1, [("r0", "a"), ("r1", "b"), ("r0", "other content")])
    await asyncio.gather(task, r.runner.run(r.pj, second))
    assert api.stats["lines_answered"] == 3  # "a" once; "b"; r0 with other content is apart
    outs = [v for _, _, v in r.publisher.out]
    assert sorted(v["id"] for v in outs) == ["r0", "r0", "r0", "r1"]
    a = [v["output"] for v in outs if v["id"] == "r0" and v["batch_job"]["id"] == outs[0][
        "batch_job"]["id"]]
    assert len(a) == 2 and a[0] == a[1]  # both deliveries, one line's answer
    assert r.pj.commit_offset() == 4 and first.cut.done and second.cut.done
    assert r.pj.lines == {}  # nothing left registered once the cuts are done


async def test_riders_of_a_cut_that_fails_take_the_normal_path(rig: Any) -> None:
    # The first cut fails with an error (the coordinator runs it again from its state, with
    # new lines): the request riding on its line from a later cut must not wait for a line
    # nobody answers (its cut would never be done, its offset never committed).
    r, mock, api = rig
    mock.behaviour.batch_delay_seconds = 0.3
    first, task = await r.running(api, [("r0", "a")])
    second = r.cut_at(1, [("r0", "a")])
    run = asyncio.create_task(r.runner.run(r.pj, second))
    await asyncio.sleep(0.05)
    assert second.riders and not run.done()

    async def broken(*args: Any) -> Any:
        raise RuntimeError("job store away")

    r.client.retrieve = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await task
    await asyncio.wait_for(run, 5)
    assert r.normal == [([1], "job_failed")] and second.cut.done and r.pj.lines == {}


async def test_a_rider_goes_down_the_normal_path_with_its_failed_line(rig: Any) -> None:
    r, mock, api = rig
    mock.behaviour.batch_delay_seconds = 0.3
    mock.behaviour.batch_error_rate = 1.0
    first, task = await r.running(api, [("r0", "a")])
    second = r.cut_at(1, [("r0", "a")])
    await asyncio.gather(task, r.runner.run(r.pj, second))
    assert r.normal == [([0, 1], "line_error")] and r.publisher.out == []
    assert second.cut.done and api.stats["batches_created"] == 1


async def test_a_cut_is_done_only_once_its_requests_on_the_normal_path_are_answered(
    rig: Any,
) -> None:
    # A done cut's requests are skipped when the partition is read again after a restart.
    # Marked done while its failed line's requests were still on the normal path, a worker
    # killed then left them with no output at all.
    r, mock, _ = rig
    mock.behaviour.batch_error_rate = 1.0
    r.settle_normal = False
    active = r.cut(["a", "b"])
    task = asyncio.create_task(r.runner.run(r.pj, active))
    while not r.normal:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert not active.cut.done and not task.done()
    r.pj.settle(0)
    r.pj.settle(1)  # the normal path's outputs acknowledged
    await task
    assert active.cut.done and r.store.saved[-1]["done"]


async def test_a_request_parked_again_after_its_answer_is_republished_not_paid(rig: Any) -> None:
    r, _, api = rig
    await r.runner.run(r.pj, r.cut_at(0, [("r0", "a")]))
    second = r.cut_at(1, [("r0", "a")])
    await r.runner.run(r.pj, second)
    assert api.stats["lines_answered"] == 1 and api.stats["batches_created"] == 1
    (_, _, first), (_, _, again) = r.publisher.out
    assert again == first  # the remembered output record, as it was
    assert r.pj.commit_offset() == 2 and second.cut.done and second.cut.parts == []


async def test_a_resumed_part_finds_its_batch_instead_of_creating_another(rig: Any) -> None:
    r, _, api = rig
    first = r.cut(["a", "b"])
    endpoint = r.settings.endpoints[0]
    file_id = await r.client.upload(endpoint, b'{"custom_id": "0", "body": {"messages": []}}\n')
    # Killed after the batch was created, before its id was written to the job store:
    await r.client.create(endpoint, file_id, {META_KEY: f"{first.cut.key}/b/m"})
    first.cut.parts = [Part("b", "m", 2, file_id=file_id)]
    await r.runner.run(r.pj, first)
    assert api.stats["batches_created"] == 1 and api.stats["files"] == 1


async def test_the_mock_cancels_lists_and_refuses_what_it_cannot_take(rig: Any) -> None:
    r, mock, api = rig
    endpoint = r.settings.endpoints[0]
    mock.behaviour.batch_delay_seconds = 60
    file_id = await r.client.upload(endpoint, b'{"custom_id": "0", "body": {}}\n')
    batch = await r.client.create(endpoint, file_id, {"k": "v"})
    assert (await r.client.retrieve(endpoint, batch["id"]))["status"] == "in_progress"
    assert (await r.client.cancel(endpoint, batch["id"]))["status"] == "cancelled"
    assert (await r.client.find(endpoint, "k", "v"))["id"] == batch["id"]  # type: ignore[index]
    assert await r.client.find(endpoint, "k", "other") is None
    assert await r.client.content(endpoint, file_id) == b'{"custom_id": "0", "body": {}}\n'
    with pytest.raises(BatchApiError, match="404"):
        await r.client.retrieve(endpoint, "batch-none")
    with pytest.raises(BatchApiError, match="400"):
        await r.client.create(endpoint, "file-none", {})
    async with aiohttp.ClientSession() as s:
        base = endpoint.url.removesuffix("/v1")
        async with s.post(f"{base}/config", json={"batch_outcome": "maybe"}) as resp:
            assert resp.status == 400 and "batch_outcome" in await resp.text()
    assert api.stats["batches_cancelled"] == 1


PRICES = {"m": {"input_per_mtok": 2.0, "output_per_mtok": 8.0, "batch_discount": 0.5}}


async def test_a_job_answer_costs_the_batch_price_and_counts_the_saving() -> None:
    async with rig_of(pricing=PRICES) as (r, _, _):
        active = r.cut(["a", "b"])
        await r.runner.run(r.pj, active)
        saved = 0.0
        for doc in r.answers().values():
            u = doc["usage"]
            normal = u["prompt_tokens"] * 2.0 / 1e6 + u["completion_tokens"] * 8.0 / 1e6
            assert doc["cost"]["total"] == pytest.approx(normal / 2, abs=1e-12)
            assert doc["cost"]["saved"] == 0.0 and doc["batch_job"]["id"]  # a paid call
            saved += normal / 2
        assert saved > 0
        assert r.metrics.cost_saved._value.get() == pytest.approx(saved, abs=1e-12)


@pytest.mark.parametrize("where", ["no_cache", "cache_off"])
async def test_identical_requests_of_other_ids_pay_their_own_lines_where_answers_are_not_shared(
        where: str) -> None:
    # As on the normal path (no content lock there): a user asking the same prompt under
    # several ids with no_cache, or with the cache off, wants that many answers (sampling).
    # Before, they shared one line and got one answer.
    off = where == "cache_off"
    async with rig_of(cache={"enabled": False} if off else None) as (r, _, api):
        over: dict[str, Any] = {} if off else {"cache": {"no_cache": True}}
        active = r.cut_at(0, [("r0", "a"), ("r1", "a"), ("r0", "a"), ("r2", "a")], **over)
        await r.runner.run(r.pj, active)
        assert api.stats["lines_answered"] == 3  # r0 (delivered twice: one line), r1, r2
        outs = [v for _, _, v in r.publisher.out]
        assert sorted(v["id"] for v in outs) == ["r0", "r0", "r1", "r2"]
        assert [v["cached"] for v in outs].count(False) == 3
        assert r.pj.commit_offset() == 4 and active.cut.done


async def test_a_request_of_another_id_with_the_same_content_rides_on_the_running_line(
        rig: Any) -> None:
    # The cache on: the normal path makes it wait for the call in flight (the content lock);
    # a later cut paid a line of its own for it.
    r, mock, api = rig
    mock.behaviour.batch_delay_seconds = 0.3
    first, task = await r.running(api, [("r0", "a")])
    second = r.cut_at(1, [("r5", "a"), ("r6", "b")])
    await asyncio.gather(task, r.runner.run(r.pj, second))
    assert api.stats["lines_answered"] == 2  # "a" once, "b"
    answers = r.answers()
    assert answers["r5"]["output"] == answers["r0"]["output"]
    assert answers["r5"]["cached"] and not answers["r0"]["cached"] and not answers["r6"]["cached"]
    assert r.pj.commit_offset() == 3 and first.cut.done and second.cut.done
    assert r.pj.lines == {}


async def test_a_shared_line_is_paid_once_and_saved_for_the_others() -> None:
    async with rig_of(pricing=PRICES) as (r, _, _):
        await r.runner.run(r.pj, r.cut(["a", "a", "a"]))
        docs = [r.answers()[f"r{i}"] for i in range(3)]
        price = docs[0]["cost"]["total"]
        assert price > 0 and docs[0]["cost"]["saved"] == 0.0
        for doc in docs[1:]:
            assert doc["cost"]["total"] == 0.0
            assert doc["cost"]["saved"] == pytest.approx(price, abs=1e-12)


async def test_a_shared_line_is_cached_even_when_its_payer_may_not_store(rig: Any) -> None:
    # The first request of a line was no_store: its answer was not stored, and the key was
    # marked stored, so the line's other requests (who may store) left the cache empty.
    r, _, _ = rig
    first = r.cut_at(0, [("r0", "a")], cache={"no_store": True})
    second = r.cut_at(1, [("r1", "a")])
    active = ActiveCut(Cut(0, 0, 2, 2), [*first.held, *second.held])
    await r.runner.run(r.pj, active)
    assert {v["id"] for _, _, v in r.publisher.out} == {"r0", "r1"}
    found = await r.cache.prefetch([second.held[0].req], ["requests"])
    assert found[0].hit is not None
