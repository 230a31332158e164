"""The embedding batcher on virtual time with a fake /embeddings upstream: batching, limits, failures."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mockllm.embeddings import embeddings_body, vector_base64, vector_for
from streams.config import EndpointConfig, Settings
from streams.contract import Completion, Params, Request
from streams.dispatch.dispatcher import Dispatcher
from streams.dispatch.parts import build_dispatcher
from streams.embedding import estimate_input_tokens
from streams.errors import (
    AttemptsExhausted,
    BudgetExceeded,
    DeadlineExpired,
    DispatchFailed,
    StreamsError,
    UpstreamStatusError,
    ValidationFailed,
)
from tests.fakes.vtime import VirtualClock, run


class FakeEmbedder:
    """Records every call (virtual time, endpoint, inputs); refuses chosen inputs with 400."""

    def __init__(self, clock: VirtualClock, latency: float = 0.02) -> None:
        self.clock = clock
        self.latency = latency
        self.refuse: set[str] = set()
        self.fail: Callable[[int], StreamsError | None] = lambda n: None
        self.calls: list[tuple[float, str, list[str]]] = []
        self.active = 0
        self.max_active = 0

    async def embed(self, endpoint: EndpointConfig, model: str, inputs: list[str],
                    params: Params) -> dict[str, Any]:
        self.calls.append((self.clock.elapsed(), endpoint.name, list(inputs)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.latency)
            exc = self.fail(len(self.calls))
            if exc is not None:
                raise exc
            if self.refuse.intersection(inputs):
                raise UpstreamStatusError("HTTP 400: refused", endpoint=endpoint.name, status=400)
            return embeddings_body(model, inputs, params.get("dimensions", 16),
                                   params.get("encoding_format", "float"))
        finally:
            self.active -= 1


def _make(clock: VirtualClock, endpoint: dict[str, Any] | None = None, latency: float = 0.02,
          **sections: Any) -> tuple[Dispatcher, FakeEmbedder, CollectorRegistry]:
    ep = {"name": "a", "url": "http://a.test/v1", **(endpoint or {})}
    settings = Settings(endpoints=[ep], **sections)
    up = FakeEmbedder(clock, latency)
    registry = CollectorRegistry()
    d = build_dispatcher(settings, up, None, registry, clock=clock, sleep=asyncio.sleep,
                         random=lambda: 0.5)
    return d, up, registry


def _req(i: int | str, **kw: Any) -> Request:
    return Request(id=f"e{i}", kind="embedding", input=f"text number {i}", model="emb", **kw)


async def _all(d: Dispatcher, reqs: list[Request]) -> list[Completion | BaseException]:
    return list(await asyncio.gather(*(d.dispatch(r) for r in reqs), return_exceptions=True))


def test_1000_inputs_at_once_share_four_calls_each_with_its_own_vector() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, registry = _make(clock)
        reqs = [_req(i) for i in range(1000)]
        async with d:
            got = await _all(d, reqs)
        assert [len(inputs) for _, _, inputs in up.calls] == [256, 256, 256, 232]
        for req, comp in zip(reqs, got, strict=True):
            assert isinstance(comp, Completion)
            assert comp.body["embedding"] == vector_for(req.input or "")
            assert comp.attempts == 1 and comp.endpoint == "a" and not comp.cached
            assert comp.body["dimensions"] == 16
        sizes = Counter(c.body["batch_size"] for c in got if isinstance(c, Completion))
        assert sizes == {256: 768, 232: 232}
        # Usage is split so that the inputs of a call add up to the call's count.
        for _, _, inputs in up.calls:
            total = embeddings_body("m", inputs, 16, "float")["usage"]["total_tokens"]
            mine = [c for r, c in zip(reqs, got, strict=True) if r.input in set(inputs)]
            assert sum(c.usage["prompt_tokens"] for c in mine if isinstance(c, Completion)) == total
        assert registry.get_sample_value("llm_streams_embedding_batch_inputs_count") == 4
        assert registry.get_sample_value("llm_streams_embedding_inputs_total",
                                         {"outcome": "ok"}) == 1000

    run(main)


def test_a_lone_request_waits_max_wait_ms_and_no_longer() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, embeddings={"max_wait_ms": 5})
        async with d:
            start = clock.elapsed()
            comp = await d.dispatch(_req(1))
        assert isinstance(comp, Completion) and comp.body["batch_size"] == 1
        assert len(up.calls) == 1
        assert up.calls[0][0] - start == pytest.approx(0.005, abs=1e-5)

    run(main)


def test_arrivals_one_ms_apart_batch_within_max_wait() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, embeddings={"max_wait_ms": 5})
        async with d:
            tasks = []
            for i in range(20):
                tasks.append(asyncio.create_task(d.dispatch(_req(i))))
                await asyncio.sleep(0.001)
            await asyncio.gather(*tasks)
        arrival = {f"text number {i}": i * 0.001 for i in range(20)}
        for t, _, inputs in up.calls:
            assert all(t - arrival[x] <= 0.005 + 1e-5 for x in inputs)
        assert len(up.calls) <= 5 and sum(len(c[2]) for c in up.calls) == 20

    run(main)


@pytest.mark.parametrize("size", [2, 7, 64, 256])
def test_one_refused_input_fails_alone_within_the_split_bound(size: int) -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock)
        reqs = [_req(i) for i in range(size)]
        bad = reqs[size // 3]
        up.refuse = {bad.input or ""}
        async with d:
            got = await _all(d, reqs)
        assert len(up.calls) <= 2 * math.ceil(math.log2(size)) + 1
        for req, comp in zip(reqs, got, strict=True):
            if req is bad:
                assert isinstance(comp, DispatchFailed)
                assert isinstance(comp.error, UpstreamStatusError) and comp.error.status == 400
                assert comp.attempts == sum(bad.input in c[2] for c in up.calls)
            else:
                assert isinstance(comp, Completion), comp
                assert comp.body["embedding"] == vector_for(req.input or "")
                assert comp.attempts == sum(req.input in c[2] for c in up.calls)

    run(main)


def test_split_calls_do_not_count_toward_max_attempts() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, retry={"max_attempts": 2, "base_delay_ms": 1})
        reqs = [_req(i) for i in range(16)]
        up.refuse = {reqs[0].input or ""}
        async with d:
            got = await _all(d, reqs)
        assert sum(isinstance(c, Completion) for c in got) == 15
        assert max(c.attempts for c in got if isinstance(c, Completion)) >= 3

    run(main)


def test_a_retryable_failure_retries_the_batch_then_exhausts() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, registry = _make(clock, retry={"max_attempts": 3, "base_delay_ms": 1,
                                              "max_delay_ms": 2})
        up.fail = lambda n: UpstreamStatusError("HTTP 503", endpoint="a", status=503) \
            if n == 1 else None
        async with d:
            got = await _all(d, [_req(i) for i in range(10)])
        assert [len(c[2]) for c in up.calls] == [10, 10]
        assert all(isinstance(c, Completion) and c.attempts == 2 for c in got)

        d, up, _ = _make(clock, retry={"max_attempts": 3, "base_delay_ms": 1, "max_delay_ms": 2})
        up.fail = lambda n: UpstreamStatusError("HTTP 500", endpoint="a", status=500)
        async with d:
            got = await _all(d, [_req(i) for i in range(10)])
        assert len(up.calls) == 3
        for c in got:
            assert isinstance(c, DispatchFailed) and isinstance(c.error, AttemptsExhausted)
            assert c.attempts == 3 and c.endpoints == ["a", "a", "a"]

    run(main)


def test_a_401_fails_the_whole_batch_without_splitting() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock)
        up.fail = lambda n: UpstreamStatusError("HTTP 401", endpoint="a", status=401)
        async with d:
            got = await _all(d, [_req(i) for i in range(32)])
        assert len(up.calls) == 1
        assert all(isinstance(c, DispatchFailed) and c.attempts == 1 for c in got)

    run(main)


def test_priority_decides_which_waiting_inputs_go_next() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, {"max_concurrency": 1}, latency=1.0,
                         embeddings={"max_batch_inputs": 4})
        async with d:
            first = asyncio.create_task(d.dispatch(_req("first")))
            await asyncio.sleep(0.1)  # the first call holds the only slot
            late = [_req(f"p9-{i}", priority=9) for i in range(8)]
            urgent = [_req(f"p0-{i}", priority=0) for i in range(4)]
            tasks = [asyncio.create_task(d.dispatch(r)) for r in late]
            await asyncio.sleep(0.01)
            tasks += [asyncio.create_task(d.dispatch(r)) for r in urgent]
            await asyncio.gather(first, *tasks)
        # The batch formed while the slot was busy took the oldest of the p9 inputs; the next
        # one, formed after that, takes all the p0 inputs although they came last.
        assert [x.split()[-1][:2] for x in up.calls[2][2]] == ["p0"] * 4

    run(main)


def test_rpm_counts_a_batch_as_one_request() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, {"rpm": 60}, latency=0.01)
        async with d:
            got = await _all(d, [_req(i) for i in range(1024)])
        assert all(isinstance(c, Completion) for c in got)
        times = [t for t, _, _ in up.calls]
        assert [len(c[2]) for c in up.calls] == [256] * 4
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert min(gaps) >= 1.0  # 60 rpm: one call per second, each with 256 inputs

    run(main)


def test_tpm_caps_a_batch_at_one_second_of_tokens() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, {"tpm": 6000}, latency=0.01)  # 100 tokens per second
        async with d:
            got = await _all(d, [_req(i) for i in range(100)])  # ~4-5 tokens each
        assert all(isinstance(c, Completion) for c in got)
        from streams.embedding import estimate_input_tokens
        for _, _, inputs in up.calls:
            assert sum(estimate_input_tokens(t) for t in inputs) <= 100

    run(main)


def test_an_input_too_large_for_every_endpoint_is_refused_at_once() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, {"tpm": 100})
        async with d:
            with pytest.raises(DispatchFailed) as info:
                await d.dispatch(Request(id="x", kind="embedding", input="y" * 1000, model="m"))
        assert isinstance(info.value.error, ValidationFailed) and not up.calls

    run(main)


def test_params_split_groups_and_base64_passes_through() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock)
        reqs = [_req(1), _req(2, params={"dimensions": 8}),
                _req(3, params={"encoding_format": "base64", "dimensions": 8})]
        async with d:
            got = await _all(d, reqs)
        assert len(up.calls) == 3
        assert isinstance(got[1], Completion) and got[1].body["embedding"] == vector_for(
            "text number 2", 8)
        assert isinstance(got[2], Completion)
        assert got[2].body["embedding"] == vector_base64("text number 3", 8)
        assert got[2].body["dimensions"] == 8

    run(main)


def test_an_input_past_its_deadline_is_expired_not_sent() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, {"max_concurrency": 1}, latency=1.0,
                         embeddings={"max_batch_inputs": 1})
        async with d:
            first = asyncio.create_task(d.dispatch(_req(1)))
            await asyncio.sleep(0.01)
            soon = int((clock() + 0.5) * 1000)
            second = asyncio.create_task(d.dispatch(_req(2)))
            third = asyncio.create_task(d.dispatch(_req(3, deadline=soon)))
            got = await asyncio.gather(first, second, third, return_exceptions=True)
        assert isinstance(got[2], DispatchFailed) and isinstance(got[2].error, DeadlineExpired)
        assert all("text number 3" not in c[2] for c in up.calls)

    run(main)


def test_max_concurrency_holds_across_batches() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, {"max_concurrency": 4}, latency=0.02,
                         embeddings={"max_batch_inputs": 8})
        async with d:
            got = await _all(d, [_req(i) for i in range(400)])
        assert all(isinstance(c, Completion) for c in got)
        assert up.max_active == 4 and len(up.calls) == 50

    run(main)


def test_stop_cancels_inputs_waiting_for_a_batch_or_a_grant() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, {"max_concurrency": 1}, latency=1.0,
                         embeddings={"max_batch_inputs": 2})
        await d.start()
        tasks = [asyncio.create_task(d.dispatch(_req(i))) for i in range(7)]
        await asyncio.sleep(0.5)  # one call under way, a batch waiting for the slot, 3 waiting
        await d.stop()
        got = await asyncio.gather(*tasks, return_exceptions=True)
        # The call under way finishes (its records are answered); the others are cancelled,
        # neither answered nor failed, so their records are redelivered after a restart.
        assert [type(g).__name__ for g in got].count("Completion") == 2
        assert [type(g).__name__ for g in got].count("CancelledError") == 5
        assert len(up.calls) == 1

    run(main)


def test_a_caller_that_gives_up_leaves_the_batch() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock, embeddings={"max_wait_ms": 50})
        async with d:
            gone = asyncio.create_task(d.dispatch(_req("gone")))
            kept = asyncio.create_task(d.dispatch(_req("kept")))
            await asyncio.sleep(0.01)
            gone.cancel()
            comp = await kept
        assert isinstance(comp, Completion) and comp.body["batch_size"] == 1
        assert [c[2] for c in up.calls] == [["text number kept"]]

    run(main)


def test_a_bug_in_a_call_fails_each_input_instead_of_stranding_it() -> None:
    async def main(clock: VirtualClock) -> None:
        d, up, _ = _make(clock)

        def bug(n: int) -> StreamsError | None:
            raise RuntimeError("client bug")

        up.fail = bug
        async with d:
            got = await _all(d, [_req(i) for i in range(5)])
        assert all(isinstance(g, RuntimeError) for g in got)  # the processor dead-letters these

    run(main)


def test_embedding_inputs_are_held_to_their_tenants_budget() -> None:
    # Embedding calls bypassed tenant budgets: a tenant with a budget could embed without limit.
    async def main(clock: VirtualClock) -> None:
        await asyncio.sleep(math.ceil(clock() / 60) * 60 - clock() + 1)  # a fresh minute
        each = estimate_input_tokens(_req(0).input or "")
        d, up, registry = _make(clock, tenants={"t": {
            "budgets": [{"window": "minute", "tokens": 3 * each}], "on_exhausted": "reject"}})
        async with d:
            results = await _all(d, [_req(i, tenant="t") for i in range(6)] + [_req(9)])
        ok = [r for r in results[:6] if isinstance(r, Completion)]
        refused = [r for r in results[:6] if isinstance(r, DispatchFailed)]
        assert len(ok) == 3 and len(refused) == 3  # reserved together: three fit the minute
        assert all(isinstance(r.error, BudgetExceeded) for r in refused)
        assert isinstance(results[6], Completion)  # another tenant, no budget
        sent = [text for _, _, inputs in up.calls for text in inputs]
        assert len(sent) == 4 and "text number 9" in sent
        assert registry.get_sample_value("llm_streams_embedding_inputs_total",
                                         {"outcome": "budget"}) == 3
    run(main)
