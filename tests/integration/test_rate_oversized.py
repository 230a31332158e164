"""A request whose token estimate exceeds every endpoint's tpm does not hold up the others.

Real broker, Redis, worker and mock. The same backlog of normal requests runs twice on a
``tpm``-limited endpoint, once alone and once behind a request asking for more tokens than
the endpoint's whole tpm: that one is a ``validation`` dead letter ("too large for any
endpoint"), and the normal requests' median wait stays within 20 % of the run without it.
(It used to be granted, pushing the shared schedule a minute ahead; the dispatcher then kept
that wait cached even after the real usage was refunded.)
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import pytest

from tests.integration.harness import Collector, Stack, encode, produce, start_mocks, start_worker

pytestmark = pytest.mark.integration

TPM = 30_000  # 500 tokens per second
NORMAL = 80  # ~29 tokens estimated each: about 5 s of the limit


async def _median_wait(tmp: Path, oversized: bool) -> tuple[float, list[dict[str, object]]]:
    [mock] = await start_mocks(1, "--latency-ms", "20")
    worker = None
    try:
        ep = {"name": "ep", "url": f"{mock.url}/v1", "timeout_seconds": 5, "tpm": TPM}
        stack = Stack(tmp / ("big" if oversized else "alone"), endpoints=[ep],
                      overrides={"cache.enabled": False})
        stack.tmp.mkdir(parents=True, exist_ok=True)
        worker = start_worker(stack)
        await worker.ready()
        docs = [{"id": f"n{i}", "input": f"normal request {i}", "model": "m",
                 "params": {"max_tokens": 20}} for i in range(NORMAL)]
        if oversized:
            docs.insert(0, {"id": "big", "input": "one huge request", "model": "m",
                            "params": {"max_tokens": TPM + 10_000}})
        await produce(stack.requests, encode(docs))
        async with Collector(stack) as collector:
            outputs = await collector.wait_for(len(docs), timeout=120)
    finally:
        if worker is not None:
            worker.stop()
        mock.stop()
    answered = [o.value for o in outputs if o.topic == stack.responses]
    letters = [o.value for o in outputs if o.topic == stack.dlq]
    assert len(answered) == NORMAL
    return statistics.median(float(v["latency_ms"]) for v in answered), letters


async def test_an_oversized_request_does_not_delay_normal_traffic(tmp_path: Path) -> None:
    (alone, none), (beside, letters) = await asyncio.gather(
        _median_wait(tmp_path, oversized=False), _median_wait(tmp_path, oversized=True)
    )
    print(f"\nnormal median wait: {alone:.0f} ms alone, {beside:.0f} ms beside the big one")
    assert none == []
    assert [(d["id"], d["error"]["type"]) for d in letters] == [("big", "validation")]  # type: ignore[index]
    assert "too large for any endpoint" in str(letters[0]["error"])
    assert beside <= alone * 1.2
