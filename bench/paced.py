"""The paced scenarios: a slow upstream (the worker against the bare pipeline, its floor, in the
same run, with the tail's breakdown) and moderate load. Requests arrive at a fixed rate from a
paced producer; the project's mock plays the upstream.
"""

from __future__ import annotations

from typing import Any

from bench import kafka_load as kl
from bench.harness import Env, Run, added_ms, measure, rate_of, steady_rate, worker_config
from bench.procs import free_port
from bench.stats import peak_overlap, percentile

SLOW = (1000, 500)  # the slow upstream: latency and jitter, ms


async def paced_mock(env: Env, scenario: str, latency_ms: int, jitter_ms: int, rate: float,
                     seconds: float, max_inflight: int, *, who: str = "streams",
                     probe: bool = False) -> dict[str, Any]:
    """One paced run against a fresh mock: the worker (``who="streams"``) or the bare pipeline
    (``who="bare"``, the same in-flight cap); with ``probe``, under bench.probe (tail figures)."""
    settle = (latency_ms + jitter_ms) / 1000.0 + 0.5  # the first answers need this long
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    mock = await env.procs.mock(port, "--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms))
    try:
        async with Run(env, scenario) as run:
            probe_file = run.probe_file(who) if probe else None
            if who == "bare":
                args = ["--url", url, "--concurrency", str(max_inflight)]
                pids = [await run.peer("bench.bare_pipeline", *args,
                                       *(["--probe", str(probe_file)] if probe_file else []))]
            else:
                eps = [{"name": "mock", "url": url, "timeout_seconds": 30}]
                cfg = worker_config(run.topics, eps, cache=False, max_inflight=max_inflight)
                pids = await run.workers(cfg, probe=probe_file)
            n = int(rate * seconds)
            m = await measure(run.topics, pids, kl.requests(n, scenario), rate=rate,
                              timeout=seconds + 60, probe_file=probe_file)
    finally:
        env.procs.stop(mock)
    recs = m["records"]
    ok = [(ts, v) for _, ts, v in recs if v.get("status") == "ok"]
    added = [added_ms(v) for _, v in ok]
    outstanding = peak_overlap((ts - v["latency_ms"], ts) for ts, v in ok)
    return {"offered_rate": rate, "rate": steady_rate(m, recs, settle),
            "throughput": rate_of(m, recs), "completed": len(recs), "sent": n,
            "ok": len(ok), "added_p50_ms": percentile(added, 50), "added_p99_ms": percentile(added, 99),
            "e2e_p50_ms": percentile([v["latency_ms"] for _, v in ok], 50),
            "peak_outstanding": outstanding, "rss_peak_mb": m["rss_peak_mb"], **m["tail"]}


async def slow_upstream(env: Env) -> dict[str, Any]:
    """Scenario 3: mock at 1000 ms +- 500 ms, four paced runs, all with 5,000 in flight at most.

    (1) The bare pipeline at 5,000 req/s offered: its highest sustained rate is the floor.
    (2) The worker at 5,000 req/s offered: its highest sustained rate (ratio to (1)) and its
    memory with 5,000 in flight; the excess queues in Kafka, so the added latency of (1) and (2)
    is the backlog's age. (3) The worker and (4) the bare pipeline at ``slow_target_share`` of
    (1)'s rate: the added latency a user sees below capacity, whether every request was answered,
    and (under bench.probe) where the tail comes from.
    """
    s = env.size
    lat, jit = SLOW
    floor = await paced_mock(env, "slow", lat, jit, s.slow_rate, s.slow_seconds, s.slow_inflight, who="bare")
    top = await paced_mock(env, "slow", lat, jit, s.slow_rate, s.slow_seconds, s.slow_inflight)
    target = round(s.slow_target_share * (floor["rate"] or s.slow_rate / 2))
    at = await paced_mock(env, "slow", lat, jit, target, s.slow_seconds, s.slow_inflight, probe=True)
    bare_at = await paced_mock(env, "slow", lat, jit, target, s.slow_seconds, s.slow_inflight, who="bare",
                               probe=True)
    tail_keys = [k for k in at if k.startswith(("loop_", "gc_", "produce_", "records_per", "fetch",
                                                "redis_"))]
    return {"offered_rate": top["offered_rate"], "rate": top["rate"], "throughput": top["throughput"],
            "peak_outstanding": top["peak_outstanding"], "rss_peak_mb": top["rss_peak_mb"],
            "saturated_added_p50_ms": top["added_p50_ms"], "saturated_added_p99_ms": top["added_p99_ms"],
            "bare_rate": floor["rate"], "bare_rss_peak_mb": floor["rss_peak_mb"],
            "ratio_vs_bare": top["rate"] / floor["rate"] if top["rate"] and floor["rate"] else None,
            "target_rate": target, "target_sustained": at["rate"],
            "added_p50_ms": at["added_p50_ms"], "added_p99_ms": at["added_p99_ms"],
            "target_sent": at["sent"], "target_ok": at["ok"], "unanswered": at["sent"] - at["ok"],
            "target_rss_peak_mb": at["rss_peak_mb"],
            "bare_added_p50_ms": bare_at["added_p50_ms"], "bare_added_p99_ms": bare_at["added_p99_ms"],
            "bare_unanswered": bare_at["sent"] - bare_at["ok"],
            **{f"streams_{k}": at[k] for k in tail_keys},
            **{f"bare_{k}": bare_at[k] for k in tail_keys if k in bare_at}}


async def moderate(env: Env) -> dict[str, Any]:
    """Scenario 4: 500 req/s paced, upstream a fixed 100 ms."""
    s = env.size
    return await paced_mock(env, "moderate", 100, 0, s.moderate_rate, s.moderate_seconds, 2000)
