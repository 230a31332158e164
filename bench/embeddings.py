"""Scenario 8: embedding requests batched across records vs one /embeddings call per record.

The mock answers /v1/embeddings in 20 ms per call (whatever the number of inputs). One worker,
cache off, unique inputs; four runs: batching (``embeddings`` defaults) and one call per record
(``embeddings.max_batch_inputs: 1``), each with the endpoint at ``max_concurrency: 4`` (as
providers cap concurrent calls) and without a cap. Rates are records answered per second,
from the first record produced to the last answer.
"""

from __future__ import annotations

from typing import Any

import orjson

from bench.harness import Env, worker_config
from bench.harness import Run as _Run
from bench.harness import measure as _measure
from bench.harness import rate_of as _rate
from bench.procs import free_port

# Records per run: (batched, one per call); one call per record at 4 concurrent calls of 20 ms
# serves ~200 records/s, so it gets fewer.
COUNTS = {"smoke": (2000, 400), "full": (60_000, 6_000)}
CALL_MS = 20


def _records(n: int, prefix: str) -> list[bytes]:
    return [orjson.dumps({"id": f"{prefix}-{i}", "kind": "embedding", "model": "emb",
                          "input": f"{prefix} document {i}: some text to embed"})
            for i in range(n)]


async def _one(env: Env, port: int, n: int, *, batch: bool, cap: int | None) -> dict[str, Any]:
    name = f"emb-{'batch' if batch else 'single'}-{cap or 'nocap'}"
    async with _Run(env, name) as run:
        ep: dict[str, Any] = {"name": "mock", "url": f"http://127.0.0.1:{port}/v1",
                              "timeout_seconds": 30}
        if cap is not None:
            ep["max_concurrency"] = cap
        cfg = worker_config(run.topics, [ep], cache=False, max_inflight=2000)
        if not batch:
            cfg["embeddings"] = {"max_batch_inputs": 1}
        pids = await run.workers(cfg)
        m = await _measure(run.topics, pids, _records(n, name), timeout=max(60, n / 100))
    recs = m["records"]
    ok = [v for _, _, v in recs if v.get("status") == "ok"]
    sizes = [v.get("batch_size") or 0 for v in ok]
    return {"rate": _rate(m, recs), "completed": len(recs), "ok": len(ok),
            "mean_batch": sum(sizes) / len(sizes) if sizes else None,
            "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6}


async def embedding_batching(env: Env) -> dict[str, Any]:
    many, few = COUNTS[env.size.name]
    port = free_port()
    mock = await env.procs.mock(port, "--latency-ms", str(CALL_MS))
    out: dict[str, Any] = {"call_ms": CALL_MS}
    try:
        for cap, label in ((4, "cap4"), (None, "nocap")):
            batched = await _one(env, port, many, batch=True, cap=cap)
            single = await _one(env, port, few if cap else many // 2, batch=False, cap=cap)
            out.update({f"{label}_batched_{k}": v for k, v in batched.items()})
            out.update({f"{label}_single_{k}": v for k, v in single.items()})
            if batched["rate"] and single["rate"]:
                out[f"{label}_ratio"] = batched["rate"] / single["rate"]
    finally:
        env.procs.stop(mock)
    return out
