"""The harness's building blocks: sizes, the run environment, one run's topics and processes,
producing a load and measuring what comes out (rates, CPU, RSS), Redis command counts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench import kafka_load as kl
from bench import probe
from bench.procs import KAFKA, PY, REDIS_URL, Procs, RssSampler, cpu_seconds


@dataclass(frozen=True)
class Size:
    name: str
    runs: int
    concurrency: int  # in flight for the miss path, the same for every peer
    miss_n: int
    peer_n: int  # bare client
    sdk_n: int  # openai, LiteLLM, faststream and Quix Streams (two orders of magnitude slower)
    hit_warm: int
    hit_n: int
    slow_rate: float  # offered req/s at 1 s upstream latency (= requests in flight): capacity, RSS
    slow_target_share: float  # the tail is measured at this share of the bare pipeline's rate
    slow_seconds: float
    slow_inflight: int
    moderate_rate: float
    moderate_seconds: float
    two_n: int
    prio_limit: float  # limits.max_requests_per_second
    prio_seconds: float  # arrivals at twice the limit for this long


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


async def clean_redis(prefix: str) -> None:
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


PEER_GRACE = 3.0  # seconds from SIGTERM to SIGKILL for a peer (Quix Streams may take 15 s to leave)


class Run:
    """One run's topics and processes; cleans up on exit."""

    def __init__(self, env: Env, scenario: str) -> None:
        self.env = env
        self.topics = kl.Topics.unique(scenario)
        self.started: list[Any] = []
        self.peers: list[Any] = []  # stopped with a short grace: their state no longer matters

    async def __aenter__(self) -> Run:
        await kl.create_topics(self.topics)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.started:
            self.env.procs.stop(p)
        for p in self.peers:
            self.env.procs.stop(p, timeout=PEER_GRACE)
        await kl.delete_topics(self.topics)
        await clean_redis(self.topics.name)

    async def workers(self, cfg: dict[str, Any], k: int = 1, probe: Path | None = None) -> list[int]:
        spawned = [self.env.procs.worker(cfg, f"worker-{self.topics.name}", probe) for _ in range(k)]
        self.started.extend(p for p, _ in spawned)
        for p, port in spawned:
            await self.env.procs.worker_ready(p, port)
        return [p.pid for p, _ in spawned]

    async def peer(self, module: str, *args: str, python: str = PY) -> int:
        """A Kafka peer process (``python -m module --requests T --responses T2 --group G ...``)
        that prints READY once it consumes; returns its pid."""
        t = self.topics
        cmd = [python, "-m", module, "--requests", t.requests, "--responses", t.responses, "--group", t.name,
               *args]
        proc = self.env.procs.spawn(cmd, f"{module.rsplit('.', 1)[-1]}-{t.name}.log", stdout_pipe=True)
        self.peers.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        if b"READY" not in line:
            raise RuntimeError(f"{module} did not start: {line!r}")
        return proc.pid

    def probe_file(self, who: str) -> Path:
        return self.env.procs.tmp / f"probe-{who}-{self.topics.name}.json"


async def measure(topics: kl.Topics, pids: list[int], values: list[bytes], *, rate: float | None = None,
                  timeout: float, expect: int | None = None, probe_file: Path | None = None) -> dict[str, Any]:
    """Produce values, wait for their outputs; rate, CPU/request, peak RSS and the outputs.

    With ``probe_file`` (a process under bench.probe), also the probe's figures and Redis's
    command counts over the window (``tail``)."""
    expect = len(values) if expect is None else expect
    async with kl.Outputs(topics) as outs, RssSampler(pids) as rss:
        cpu0 = sum(cpu_seconds(p) for p in pids)
        before = probe.read(str(probe_file)) if probe_file else None
        cmds0 = await redis_commands() if probe_file else {}
        t_end = time.monotonic() + timeout
        t0 = await kl.produce(topics.requests, values, rate=rate, deadline=t_end)
        t_produced = time.time()
        got = await outs.wait(expect, max(1.0, t_end - time.monotonic()), interval=0.05)
        t_done = time.time()
        cpu1 = sum(cpu_seconds(p) for p in pids)
        tail: dict[str, Any] = {}
        if probe_file:
            await asyncio.sleep(0.3)  # one more write of the probe's file
            tail = probe.window(before, probe.read(str(probe_file)), got)
            cmds = await redis_commands()
            tail.update(redis_per_request(cmds0, cmds, got))
        records = await outs.read()
    return {"t0": t0, "t_produced": t_produced, "t_done": t_done, "got": got, "cpu": cpu1 - cpu0,
            "rss_peak_mb": rss.peak, "records": records, "tail": tail}


async def redis_commands() -> dict[str, int]:
    """Calls per command since Redis started (INFO commandstats): the bench's Redis is private."""
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        info = await r.info("commandstats")
    except Exception:  # a figure of the report, never a reason to fail a run
        return {}
    finally:
        await r.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if isinstance(v, dict)}


def redis_per_request(before: dict[str, int], after: dict[str, int], answered: int) -> dict[str, Any]:
    """Redis commands per answered request in a window; scripts (the rate limiter's GCRA) apart."""
    if not after:
        return {}
    d = {k: v - before.get(k, 0) for k, v in after.items()}
    d.pop("info", None)
    scripts = sum(v for k, v in d.items() if k.startswith(("evalsha", "eval", "fcall")))
    per = max(1, answered)
    return {"redis_cmds_per_req": sum(d.values()) / per, "redis_scripts_per_req": scripts / per}


def rate_of(m: dict[str, Any], records: list[tuple[str, int, dict[str, Any]]]) -> float | None:
    if not records:
        return None
    last = max(ts for _, ts, _ in records) / 1000.0
    return len(records) / max(1e-3, last - m["t0"])


def steady_rate(m: dict[str, Any], records: list[tuple[str, int, dict[str, Any]]],
                 settle: float) -> float | None:
    """Answers per second published between t0 + settle and the end of a paced production
    (the steady state: no start-up ramp, no tail); None when that window is under 1 s."""
    lo, hi = m["t0"] + settle, m["t_produced"]
    if hi - lo < 1.0:
        return None
    return sum(1 for _, ts, _ in records if lo <= ts / 1000.0 < hi) / (hi - lo)


def ok_values(records: list[tuple[str, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [v for _, _, v in records if v.get("status") == "ok"]


def added_ms(v: dict[str, Any]) -> float:
    upstream = ((v.get("response") or {}).get("mock") or {}).get("latency_ms", 0.0)
    return float(v["latency_ms"]) - float(upstream)


