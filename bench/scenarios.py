"""The benchmark scenarios. Each function performs ONE run and returns a flat dict of figures.

Every run gets its own topics, consumer group and Redis key prefix, starts its own worker(s)
and helper processes, bounds its load in count and time, and stops what it started. The
paced scenarios (slow upstream, moderate load) are in bench.paced.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench import kafka_load as kl
from bench.harness import (
    Env,
    Run,
    Size,
    endpoints,
    measure,
    ok_values,
    rate_of,
    steady_rate,
    worker_config,
)
from bench.paced import moderate, slow_upstream
from bench.procs import CANNED, PY, QUIX_PY, REDIS_URL
from bench.stats import percentile

SIZES = {
    "smoke": Size("smoke", runs=1, concurrency=256, miss_n=1500, peer_n=1500, sdk_n=300, hit_warm=100,
                  hit_n=3000, slow_rate=800, slow_target_share=0.8, slow_seconds=3, slow_inflight=5000,
                  moderate_rate=500, moderate_seconds=3, two_n=1500, prio_limit=100, prio_seconds=3),
    "full": Size("full", runs=3, concurrency=512, miss_n=20_000, peer_n=20_000, sdk_n=3000, hit_warm=1000,
                 hit_n=40_000, slow_rate=5000, slow_target_share=0.8, slow_seconds=12, slow_inflight=5000,
                 moderate_rate=500, moderate_seconds=20, two_n=20_000, prio_limit=200, prio_seconds=10),
}

# Kafka peers of the miss path: (name, interpreter, extra args of bench.app_peers). Each consumes
# the requests topic and publishes one response per request, like the worker.
KAFKA_PEERS = (("faststream", PY, ["faststream"]), ("quix", QUIX_PY, ["quix"]))


# --- peers -------------------------------------------------------------------------------------


async def kafka_peer(env: Env, name: str, module: str, args: list[str], n: int,
                     warm: int = 0, wall_clock: bool = False, python: str = PY) -> dict[str, Any]:
    """One run of a Kafka peer on the miss path: its rate and CPU from the first request
    produced to the last answer (after ``warm`` answered requests that are not counted).

    The last answer's time is its record's timestamp, as for the worker, or with ``wall_clock``
    when the harness saw it (within 50 ms): Quix Streams stamps its outputs with the input's
    timestamp, so there the outputs' own timestamps say nothing of when they were published."""
    async with Run(env, name) as run:
        urls = [a for u in env.urls for a in ("--url", u)]
        pid = await run.peer(module, *args, "--concurrency", str(env.size.concurrency), *urls, python=python)
        if warm:
            async with kl.Outputs(run.topics) as outs:
                await kl.produce(run.topics.requests, kl.requests(warm, "warm"))
                if await outs.wait(warm, 90) < warm:
                    raise RuntimeError(f"{name}: warm-up did not finish")
        m = await measure(run.topics, [pid], kl.requests(n, name), timeout=max(60, n / 20),
                          expect=warm + n)
    recs = [r for r in m["records"] if str(r[2].get("id", "")).startswith(f"{name}-")]
    rate = len(recs) / max(1e-3, m["t_done"] - m["t0"]) if wall_clock else rate_of(m, recs)
    return {"rate": rate, "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
            "completed": len(recs)}


async def bare_pipeline(env: Env, n: int) -> dict[str, Any]:
    return await kafka_peer(env, "bare", "bench.bare_pipeline", [], n)


async def client_peer(env: Env, kind: str, n: int) -> dict[str, Any]:
    args = [PY, "-m", "bench.peers", kind, "--n", str(n), "--concurrency", str(env.size.concurrency),
            "--timeout", str(max(60, n / 50))]
    for u in env.urls:
        args += ["--url", u]
    proc = env.procs.spawn(args, f"peer-{kind}.log", stdout_pipe=True)
    try:
        out, _ = await asyncio.to_thread(proc.communicate, None, max(90, n / 40) + 60)
    finally:
        env.procs.stop(proc)
    lines = out.decode().strip().splitlines()
    res: dict[str, Any] = orjson.loads(lines[-1]) if lines else {"error": "no output"}
    if "skipped" in res:
        env.note(f"peer {kind} skipped: {res['skipped']}")
    if "error" in res:
        env.note(f"peer {kind} failed: {res['error']}")
    return res


# --- scenario 1 and 5: the miss path -----------------------------------------------------------


async def streams_miss(env: Env, n: int, workers: int = 1) -> dict[str, Any]:
    async with Run(env, "miss") as run:
        cfg = worker_config(run.topics, endpoints(env.urls), cache=False, max_inflight=env.size.concurrency)
        pids = await run.workers(cfg, workers)
        m = await measure(run.topics, pids, kl.requests(n, "miss"), timeout=max(60, n / 100))
    recs = m["records"]
    return {"rate": rate_of(m, recs), "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
            "completed": len(recs), "ok": len(ok_values(recs)), "rss_peak_mb": m["rss_peak_mb"]}


async def miss_path(env: Env, n: int | None = None, peers: bool | None = None) -> dict[str, Any]:
    """Scenario 1: one worker, near-free upstream, cache off, unique prompts; peers side by side."""
    s = env.size
    n = n or s.miss_n
    peers = env.peers if peers is None else peers
    out: dict[str, Any] = {}
    r = await streams_miss(env, n)
    out.update({f"streams_{k}": v for k, v in r.items()})
    if peers:
        b = await bare_pipeline(env, n)
        out.update({f"bare_pipeline_{k}": v for k, v in b.items()})
        for kind, count in (("client", s.peer_n), ("openai", s.sdk_n), ("litellm", s.sdk_n)):
            p = await client_peer(env, kind, count)
            if "rate" in p:
                out[f"{kind}_rate"] = p["rate"]
                out[f"{kind}_cpu_per_req_us"] = p["cpu_per_req_us"]
        for name, python, args in KAFKA_PEERS:
            try:
                p = await kafka_peer(env, name, "bench.app_peers", args, s.sdk_n, warm=50, wall_clock=True,
                                     python=python)
            except Exception as exc:  # a peer that cannot run is a note, not a failed scenario
                env.note(f"peer {name} failed: {type(exc).__name__}: {exc}"[:300])
                continue
            out[f"{name}_rate"] = p["rate"]
            out[f"{name}_cpu_per_req_us"] = p["cpu_per_req_us"]
        for peer in ("bare_pipeline", "client", "openai", "litellm", "faststream", "quix"):
            if out.get(f"{peer}_rate") and out.get("streams_rate"):
                out[f"ratio_vs_{peer}"] = out["streams_rate"] / out[f"{peer}_rate"]
    return out


async def two_workers(env: Env) -> dict[str, Any]:
    """Scenario 5: one vs two workers in one group on the miss path."""
    n = env.size.two_n
    one = await streams_miss(env, n, workers=1)
    two = await streams_miss(env, n, workers=2)
    return {"one_rate": one["rate"], "one_cpu_per_req_us": one["cpu_per_req_us"],
            "two_rate": two["rate"], "two_cpu_per_req_us": two["cpu_per_req_us"],
            "scaling": (two["rate"] or 0) / one["rate"] if one["rate"] else None}


# --- scenario 2: cache hits --------------------------------------------------------------------


def hot_prompt(i: int) -> str:
    return f"hot prompt {i}"


async def cache_hit(env: Env) -> dict[str, Any]:
    """Scenario 2: the worker with a warm cache, then (with peers) the bare relay, its floor."""
    s = env.size
    async with Run(env, "hit") as run:
        cfg = worker_config(run.topics, endpoints(env.urls), cache=True, max_inflight=s.concurrency)
        pids = await run.workers(cfg)
        warm = kl.requests(s.hit_warm, "warm", prompt=hot_prompt)
        async with kl.Outputs(run.topics) as outs:
            await kl.produce(run.topics.requests, warm)
            if await outs.wait(len(warm), 60) < len(warm):
                raise RuntimeError("cache warm-up did not finish")
        hits = kl.requests(s.hit_n, "hit", prompt=lambda i: hot_prompt(i % s.hit_warm))
        m = await measure(run.topics, pids, hits, timeout=max(60, s.hit_n / 200),
                          expect=len(warm) + len(hits))
    recs = [r for r in m["records"] if str(r[2].get("id", "")).startswith("hit-")]
    cached = sum(1 for _, _, v in recs if v.get("cached"))
    out = {"rate": rate_of(m, recs), "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
           "completed": len(recs), "hit_ratio": cached / max(1, len(recs))}
    if env.peers:
        relay = await bare_relay(env)
        out.update({f"relay_{k}": v for k, v in relay.items()})
        if relay["rate"] and out["rate"]:
            out["ratio_vs_relay"] = out["rate"] / relay["rate"]
    return out


async def bare_relay(env: Env) -> dict[str, Any]:
    """The cache-hit path's floor: bench.bare_relay over the same hits, its keys seeded in Redis."""
    s = env.size
    async with Run(env, "relay") as run:
        r = aioredis.Redis.from_url(REDIS_URL)
        try:
            body = orjson.dumps(CANNED)
            await r.mset({relay_key(run.topics.name, hot_prompt(i)): body for i in range(s.hit_warm)})
        finally:
            await r.aclose()
        pid = await run.peer("bench.bare_relay", "--prefix", run.topics.name)
        hits = kl.requests(s.hit_n, "hit", prompt=lambda i: hot_prompt(i % s.hit_warm))
        m = await measure(run.topics, [pid], hits, timeout=max(60, s.hit_n / 200))
    recs = m["records"]
    cached = sum(1 for _, _, v in recs if v.get("cached"))
    return {"rate": rate_of(m, recs), "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
            "completed": len(recs), "hit_ratio": cached / max(1, len(recs))}


def relay_key(prefix: str, prompt: str) -> str:
    """The bare relay's cache key of a prompt (its own scheme: it is a floor, not a twin)."""
    return f"{prefix}:hit:{hashlib.sha256(prompt.encode()).hexdigest()}"


# --- scenario 6: priority under saturation ------------------------------------------------------


async def priority(env: Env) -> dict[str, Any]:
    s = env.size
    limit = s.prio_limit
    async with Run(env, "prio") as run:
        cfg = worker_config(run.topics, endpoints(env.urls), cache=False, max_inflight=5000,
                            max_requests_per_second=limit)
        pids = await run.workers(cfg)
        n = int(2 * limit * s.prio_seconds)
        values = kl.requests(n, "prio", priority=lambda i: 0 if i % 2 == 0 else 9)
        m = await measure(run.topics, pids, values, rate=2 * limit, timeout=2 * s.prio_seconds + 60)
    ok = ok_values(m["records"])
    waits: dict[int, list[float]] = {0: [], 9: []}
    for v in ok:
        waits[int((v.get("metadata") or {}).get("priority", 5))].append(float(v["latency_ms"]))
    rate = steady_rate(m, m["records"], 1.0)
    return {"limit_rps": limit, "offered_rate": 2 * limit, "rate": rate,
            "share_of_limit": None if rate is None else rate / limit,
            "completed": len(m["records"]),
            "p0_wait_p50_ms": percentile(waits[0], 50), "p9_wait_p50_ms": percentile(waits[9], 50),
            "p0_wait_p99_ms": percentile(waits[0], 99), "p9_wait_p99_ms": percentile(waits[9], 99)}


async def pipeline_miss(env: Env) -> dict[str, Any]:
    """A pipeline beside the native miss path (bench/pipelines.py)."""
    from bench.pipelines import pipeline_miss as run  # it builds on this module's helpers

    return await run(env)


async def embeddings(env: Env) -> dict[str, Any]:
    """Scenario 8: embeddings batched across records vs one call per record (bench/embeddings.py)."""
    from bench.embeddings import embedding_batching

    return await embedding_batching(env)


SCENARIOS = {
    "miss_path": miss_path,
    "cache_hit": cache_hit,
    "slow_upstream": slow_upstream,
    "moderate_load": moderate,
    "two_workers": two_workers,
    "priority": priority,
    "pipeline_miss": pipeline_miss,
    "embeddings": embeddings,
}
