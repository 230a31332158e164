"""The benchmark scenarios. Each function performs ONE run and returns a flat dict of figures.

Every run gets its own topics, consumer group and Redis key prefix, starts its own worker(s)
and helper processes, bounds its load in count and time, and stops what it started.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench import kafka_load as kl
from bench.procs import KAFKA, PY, REDIS_URL, Procs, RssSampler, cpu_seconds, free_port
from bench.stats import peak_overlap, percentile


@dataclass(frozen=True)
class Size:
    name: str
    runs: int
    concurrency: int  # in flight for the miss path, the same for every peer
    miss_n: int
    peer_n: int  # bare client
    sdk_n: int  # openai and LiteLLM (two orders of magnitude slower)
    hit_warm: int
    hit_n: int
    slow_rate: float  # offered req/s at 1 s upstream latency (= requests in flight): capacity, RSS
    slow_target_rate: float  # offered req/s at which the added latency is measured
    slow_seconds: float
    slow_inflight: int
    moderate_rate: float
    moderate_seconds: float
    two_n: int
    prio_limit: float  # limits.max_requests_per_second
    prio_seconds: float  # arrivals at twice the limit for this long


SIZES = {
    "smoke": Size("smoke", runs=1, concurrency=256, miss_n=1500, peer_n=1500, sdk_n=300, hit_warm=100,
                  hit_n=3000, slow_rate=800, slow_target_rate=400, slow_seconds=3, slow_inflight=5000,
                  moderate_rate=500, moderate_seconds=3, two_n=1500, prio_limit=100, prio_seconds=3),
    "full": Size("full", runs=3, concurrency=512, miss_n=20_000, peer_n=20_000, sdk_n=3000, hit_warm=1000,
                 hit_n=40_000, slow_rate=5000, slow_target_rate=2500, slow_seconds=12, slow_inflight=5000,
                 moderate_rate=500, moderate_seconds=20, two_n=20_000, prio_limit=200, prio_seconds=10),
}


@dataclass
class Env:
    procs: Procs
    urls: list[str]  # the nginx stand-ins' base URLs (…/v1), weighted 3:1
    size: Size
    peers: bool = True
    notes: list[str] | None = None

    def note(self, text: str) -> None:
        if self.notes is not None and text not in self.notes:
            self.notes.append(text)


def endpoints(urls: list[str], timeout: float = 30.0) -> list[dict[str, Any]]:
    return [{"name": f"ep-{i}", "url": u, "weight": w, "timeout_seconds": timeout}
            for i, (u, w) in enumerate(zip(urls, (3, 1), strict=False))]


def worker_config(topics: kl.Topics, eps: list[dict[str, Any]], *, cache: bool, max_inflight: int,
                  **limits: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": KAFKA, "group_id": topics.name, "partitions": kl.PARTITIONS,
                  "commit_interval_seconds": 1.0, "session_timeout_seconds": 10},
        "topics": {"requests": topics.requests, "responses": topics.responses, "dead_letter": topics.dlq},
        "redis": {"url": REDIS_URL, "key_prefix": topics.name},
        "cache": {"enabled": cache, "ttl_seconds": 900, "idempotency_ttl_seconds": 900},
        "limits": {"max_inflight": max_inflight, **limits},
        "endpoints": eps,
        "worker": {"shutdown_grace_seconds": 3, "log_level": "WARNING"},
    }


async def _clean_redis(prefix: str) -> None:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        batch = []
        async for key in r.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await r.delete(*batch)
                batch = []
        if batch:
            await r.delete(*batch)
    except Exception:  # cleanup is best effort
        pass
    finally:
        await r.aclose()


class _Run:
    """One run's topics and processes; cleans up on exit."""

    def __init__(self, env: Env, scenario: str) -> None:
        self.env = env
        self.topics = kl.Topics.unique(scenario)
        self.started: list[Any] = []

    async def __aenter__(self) -> _Run:
        await kl.create_topics(self.topics)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.started:
            self.env.procs.stop(p)
        await kl.delete_topics(self.topics)
        await _clean_redis(self.topics.name)

    async def workers(self, cfg: dict[str, Any], k: int = 1) -> list[int]:
        spawned = [self.env.procs.worker(cfg, f"worker-{self.topics.name}") for _ in range(k)]
        self.started.extend(p for p, _ in spawned)
        for p, port in spawned:
            await self.env.procs.worker_ready(p, port)
        return [p.pid for p, _ in spawned]


async def _measure(topics: kl.Topics, pids: list[int], values: list[bytes], *, rate: float | None = None,
                   timeout: float, expect: int | None = None) -> dict[str, Any]:
    """Produce values, wait for their outputs; rate, CPU/request, peak RSS and the outputs."""
    expect = len(values) if expect is None else expect
    async with kl.Outputs(topics) as outs, RssSampler(pids) as rss:
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t_end = time.monotonic() + timeout
        t0 = await kl.produce(topics.requests, values, rate=rate, deadline=t_end)
        t_produced = time.time()
        got = await outs.wait(expect, max(1.0, t_end - time.monotonic()))
        cpu1 = sum(cpu_seconds(p) for p in pids)
        records = await outs.read()
    return {"t0": t0, "t_produced": t_produced, "got": got, "cpu": cpu1 - cpu0, "rss_peak_mb": rss.peak,
            "records": records}


def _rate(m: dict[str, Any], records: list[tuple[str, int, dict[str, Any]]]) -> float | None:
    if not records:
        return None
    last = max(ts for _, ts, _ in records) / 1000.0
    return len(records) / max(1e-3, last - m["t0"])


def _steady_rate(m: dict[str, Any], records: list[tuple[str, int, dict[str, Any]]],
                 settle: float) -> float | None:
    """Answers per second published between t0 + settle and the end of a paced production
    (the steady state: no start-up ramp, no tail); None when that window is under 1 s."""
    lo, hi = m["t0"] + settle, m["t_produced"]
    if hi - lo < 1.0:
        return None
    return sum(1 for _, ts, _ in records if lo <= ts / 1000.0 < hi) / (hi - lo)


def _ok(records: list[tuple[str, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [v for _, _, v in records if v.get("status") == "ok"]


def _added(v: dict[str, Any]) -> float:
    upstream = ((v.get("response") or {}).get("mock") or {}).get("latency_ms", 0.0)
    return float(v["latency_ms"]) - float(upstream)


# --- peers -------------------------------------------------------------------------------------


async def bare_pipeline(env: Env, n: int) -> dict[str, Any]:
    procs = env.procs
    async with _Run(env, "bare") as run:
        args = [PY, "-m", "bench.bare_pipeline", "--requests", run.topics.requests,
                "--responses", run.topics.responses, "--group", run.topics.name,
                "--concurrency", str(env.size.concurrency)]
        for u in env.urls:
            args += ["--url", u]
        proc = procs.spawn(args, f"bare-{run.topics.name}.log", stdout_pipe=True)
        run.started.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        if b"READY" not in line:
            raise RuntimeError(f"bare pipeline did not start: {line!r}")
        m = await _measure(run.topics, [proc.pid], kl.requests(n, "bare"), timeout=max(60, n / 200))
    recs = m["records"]
    return {"rate": _rate(m, recs), "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
            "completed": len(recs)}


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
    async with _Run(env, "miss") as run:
        cfg = worker_config(run.topics, endpoints(env.urls), cache=False, max_inflight=env.size.concurrency)
        pids = await run.workers(cfg, workers)
        m = await _measure(run.topics, pids, kl.requests(n, "miss"), timeout=max(60, n / 100))
    recs = m["records"]
    return {"rate": _rate(m, recs), "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
            "completed": len(recs), "ok": len(_ok(recs)), "rss_peak_mb": m["rss_peak_mb"]}


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
        for peer in ("bare_pipeline", "client", "openai", "litellm"):
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


async def cache_hit(env: Env) -> dict[str, Any]:
    s = env.size
    async with _Run(env, "hit") as run:
        cfg = worker_config(run.topics, endpoints(env.urls), cache=True, max_inflight=s.concurrency)
        pids = await run.workers(cfg)
        warm = kl.requests(s.hit_warm, "warm", prompt=lambda i: f"hot prompt {i}")
        async with kl.Outputs(run.topics) as outs:
            await kl.produce(run.topics.requests, warm)
            if await outs.wait(len(warm), 60) < len(warm):
                raise RuntimeError("cache warm-up did not finish")
        hits = kl.requests(s.hit_n, "hit", prompt=lambda i: f"hot prompt {i % s.hit_warm}")
        m = await _measure(run.topics, pids, hits, timeout=max(60, s.hit_n / 200),
                           expect=len(warm) + len(hits))
    recs = [r for r in m["records"] if str(r[2].get("id", "")).startswith("hit-")]
    cached = sum(1 for _, _, v in recs if v.get("cached"))
    return {"rate": _rate(m, recs), "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
            "completed": len(recs), "hit_ratio": cached / max(1, len(recs))}


# --- scenarios 3 and 4: slow upstream, moderate load --------------------------------------------


async def _paced_mock(env: Env, scenario: str, latency_ms: int, jitter_ms: int, rate: float,
                      seconds: float, max_inflight: int) -> dict[str, Any]:
    settle = (latency_ms + jitter_ms) / 1000.0 + 0.5  # the first answers need this long
    port = free_port()
    mock = await env.procs.mock(port, "--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms))
    try:
        async with _Run(env, scenario) as run:
            eps = [{"name": "mock", "url": f"http://127.0.0.1:{port}/v1", "timeout_seconds": 30}]
            cfg = worker_config(run.topics, eps, cache=False, max_inflight=max_inflight)
            pids = await run.workers(cfg)
            n = int(rate * seconds)
            m = await _measure(run.topics, pids, kl.requests(n, scenario), rate=rate,
                               timeout=seconds + 60)
    finally:
        env.procs.stop(mock)
    recs = m["records"]
    ok = [(ts, v) for _, ts, v in recs if v.get("status") == "ok"]
    added = [_added(v) for _, v in ok]
    outstanding = peak_overlap((ts - v["latency_ms"], ts) for ts, v in ok)
    return {"offered_rate": rate, "rate": _steady_rate(m, recs, settle),
            "throughput": _rate(m, recs), "completed": len(recs), "sent": n,
            "ok": len(ok), "added_p50_ms": percentile(added, 50), "added_p99_ms": percentile(added, 99),
            "e2e_p50_ms": percentile([v["latency_ms"] for _, v in ok], 50),
            "peak_outstanding": outstanding, "rss_peak_mb": m["rss_peak_mb"]}


async def slow_upstream(env: Env) -> dict[str, Any]:
    """Scenario 3: mock at 1000 ms +- 500 ms, two paced runs of one worker.

    At the target rate (2,500 req/s: ~2,500 in flight) for the added latency a user sees at that
    rate; then at 5,000 req/s offered (5,000 in flight) for the highest rate the worker sustains
    and its memory. At 5,000 offered the worker is past its capacity on this machine, so the
    excess queues in Kafka and that run's added latency measures the backlog (reported apart).
    """
    s = env.size
    at = await _paced_mock(env, "slow", 1000, 500, s.slow_target_rate, s.slow_seconds,
                           s.slow_inflight)
    top = await _paced_mock(env, "slow", 1000, 500, s.slow_rate, s.slow_seconds, s.slow_inflight)
    return {**top,
            "target_rate": at["offered_rate"], "target_sustained": at["rate"],
            "added_p50_ms": at["added_p50_ms"], "added_p99_ms": at["added_p99_ms"],
            "saturated_added_p50_ms": top["added_p50_ms"],
            "saturated_added_p99_ms": top["added_p99_ms"],
            "sent": at["sent"] + top["sent"], "ok": at["ok"] + top["ok"],
            "rss_peak_mb": max(at["rss_peak_mb"] or 0, top["rss_peak_mb"] or 0)}


async def moderate(env: Env) -> dict[str, Any]:
    """Scenario 4: 500 req/s paced, upstream a fixed 100 ms."""
    s = env.size
    return await _paced_mock(env, "moderate", 100, 0, s.moderate_rate, s.moderate_seconds, 2000)


# --- scenario 6: priority under saturation ------------------------------------------------------


async def priority(env: Env) -> dict[str, Any]:
    s = env.size
    limit = s.prio_limit
    async with _Run(env, "prio") as run:
        cfg = worker_config(run.topics, endpoints(env.urls), cache=False, max_inflight=5000,
                            max_requests_per_second=limit)
        pids = await run.workers(cfg)
        n = int(2 * limit * s.prio_seconds)
        values = kl.requests(n, "prio", priority=lambda i: 0 if i % 2 == 0 else 9)
        m = await _measure(run.topics, pids, values, rate=2 * limit, timeout=2 * s.prio_seconds + 60)
    ok = _ok(m["records"])
    waits: dict[int, list[float]] = {0: [], 9: []}
    for v in ok:
        waits[int((v.get("metadata") or {}).get("priority", 5))].append(float(v["latency_ms"]))
    rate = _steady_rate(m, m["records"], 1.0)
    return {"limit_rps": limit, "offered_rate": 2 * limit, "rate": rate,
            "share_of_limit": None if rate is None else rate / limit,
            "completed": len(m["records"]),
            "p0_wait_p50_ms": percentile(waits[0], 50), "p9_wait_p50_ms": percentile(waits[9], 50),
            "p0_wait_p99_ms": percentile(waits[0], 99), "p9_wait_p99_ms": percentile(waits[9], 99)}


async def embeddings(env: Env) -> dict[str, Any]:
    """Scenario 7: embeddings batched across records vs one call per record (bench/embeddings.py)."""
    from bench.embeddings import embedding_batching

    return await embedding_batching(env)


SCENARIOS = {
    "miss_path": miss_path,
    "cache_hit": cache_hit,
    "slow_upstream": slow_upstream,
    "moderate_load": moderate,
    "two_workers": two_workers,
    "priority": priority,
    "embeddings": embeddings,
}
