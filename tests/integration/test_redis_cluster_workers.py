"""Worker processes on a real Redis Cluster (3 masters, 3 replicas), end to end through Kafka.

- cache hits and coalescing across two workers, and a redelivered record replayed;
- Redis commands per request on the miss and the hit path (``INFO commandstats``), on the
  single Redis of the stack and on the cluster, with the share of the limiter's shard;
- a master killed mid-run (the one holding the limiter's hash tag) and its replica promoted:
  nothing lost, and the rate limit within the local fallback's bound (README "Scaling out").
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from streams.dispatch.ratelimit import RATE_HEADROOM, RESERVE_AHEAD_SECONDS
from streams.redis_cluster import shared_tag
from tests.integration.harness import (
    REDIS_HOST,
    REDIS_PORT,
    Collector,
    Mock,
    Stack,
    StartMock,
    encode,
    produce,
    running,
    window_sums,
)
from tests.integration.redis_cluster import LocalCluster
from tests.integration.test_cache_pipeline import (
    test_with_the_cache_disabled_a_redelivered_record_is_not_called_again as _redelivery_is_replayed,
)
from tests.integration.test_rate_quota import CONNECT_WARMUP, SLACK

pytestmark = pytest.mark.integration


def _stack(tmp: Path, cluster: LocalCluster | None, mocks: list[Mock], **ep: Any) -> Stack:
    endpoints = [{"name": "ep", "url": f"{mocks[0].url}/v1", "timeout_seconds": 5, **ep}]
    if cluster is None:
        return Stack(tmp, endpoints=endpoints)
    return Stack(tmp, endpoints=endpoints, redis_url=cluster.url,
                 overrides={"redis.cluster": True})


def _doc(i: int, prompt: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"req-{i}", "input": f"cluster prompt {prompt}", **kw}


async def _calls(mocks: list[Mock]) -> int:
    return sum([(await m.stats())["calls"] for m in mocks])


async def test_two_workers_coalesce_and_hit_on_a_cluster(
    tmp_path: Path, redis_cluster: LocalCluster, mocks: list[Mock]
) -> None:
    await mocks[0].configure(latency_ms=300)
    stack = _stack(tmp_path, redis_cluster, mocks)
    async with running(stack, 2) as workers:
        async with Collector(stack) as col:
            await produce(stack.requests, encode(_doc(i, 7) for i in range(200)))
            outs = await col.wait_for(200, timeout=120)
            assert await _calls(mocks) == 1  # 200 identical prompts, two workers: one call
            await produce(stack.requests, encode(_doc(1000 + i, 1000 + i) for i in range(300)))
            await col.wait_for(500, timeout=120)
            await produce(stack.requests, encode(_doc(2000 + i, 1000 + i) for i in range(300)))
            outs = await col.wait_for(800, timeout=120)
            hits = sum([await w.metric("llm_streams_cache_hits_total") for w in workers])
    assert all(o.value["status"] == "ok" for o in outs)
    again = [o.value for o in outs if int(o.value["id"].removeprefix("req-")) >= 2000]
    assert len(again) == 300 and all(v["cached"] for v in again)
    assert await _calls(mocks) == 1 + 300 and hits == 300


async def test_a_redelivered_record_is_replayed_on_a_cluster(
    tmp_path: Path, redis_cluster: LocalCluster, mocks: list[Mock]
) -> None:
    # the single-Redis test, on the cluster: the group rewound, no record is called twice
    await _redelivery_is_replayed(_stack(tmp_path, redis_cluster, mocks), mocks)


# ---- Redis commands per request ---------------------------------------------------------------


def _calls_by_node(ports: list[int]) -> dict[int, Counter[str]]:
    out: dict[int, Counter[str]] = {}
    for port in ports:
        with redis.Redis(host=REDIS_HOST, port=port) as r:
            stats = r.info("commandstats")
        out[port] = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
                             if k not in ("cmdstat_info", "cmdstat_config|resetstat")})
    return out


def _cpu(ports: list[int]) -> dict[int, float]:
    """Seconds of CPU each Redis has used (user + system, main thread and the rest)."""
    out = {}
    for port in ports:
        with redis.Redis(host=REDIS_HOST, port=port) as r:
            info = r.info("cpu")
        out[port] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return out


def _reset(ports: list[int]) -> None:
    for port in ports:
        with redis.Redis(host=REDIS_HOST, port=port) as r:
            r.config_resetstat()


@pytest.mark.parametrize("mode", ["single", "cluster"])
async def test_redis_commands_per_request(
    tmp_path: Path, redis_cluster: LocalCluster, mocks: list[Mock], mode: str
) -> None:
    n = int(os.environ.get("REDIS_STATS_REQUESTS", "400"))  # more for README's measurement
    cluster = redis_cluster if mode == "cluster" else None
    stack = _stack(tmp_path, cluster, mocks, rpm=6_000_000)  # a limit: its script counts too
    ports = redis_cluster.masters() if cluster else [REDIS_PORT]
    tag_port = redis_cluster.master_of(key_slot(shared_tag(stack.config()["redis"]["key_prefix"]
                                                           ).encode())) if cluster else REDIS_PORT
    await mocks[0].configure(latency_ms=20)
    phases: dict[str, dict[int, Counter[str]]] = {}
    elapsed: dict[str, float] = {}
    cpu: dict[str, dict[int, float]] = {}
    async with running(stack):
        async with Collector(stack) as col:
            for phase, base in (("miss", 0), ("hit", n)):
                await asyncio.sleep(0.5)
                _reset(ports)
                before = _cpu(ports)
                started = time.monotonic()
                await produce(stack.requests, encode(_doc(base + i, i) for i in range(n)))
                await col.wait_for(base + n, timeout=120)
                await asyncio.sleep(0.3)  # the last writes and releases
                phases[phase] = _calls_by_node(ports)
                elapsed[phase] = time.monotonic() - started
                after = _cpu(ports)
                cpu[phase] = {p: after[p] - before[p] for p in ports}
    assert await _calls(mocks) == n
    lines = []
    for phase, nodes in phases.items():
        total: Counter[str] = sum(nodes.values(), Counter())
        per_req = sum(total.values()) / n
        tag_share = sum(nodes[tag_port].values()) / max(1, sum(total.values()))
        detail = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(total.items()))
        us = sum(cpu[phase].values()) / n * 1e6
        lines.append(f"{mode} {phase}: {per_req:.2f} commands/request ({detail}); "
                     f"limiter's shard {tag_share:.0%} of commands, "
                     f"{cpu[phase][tag_port] / max(1e-9, sum(cpu[phase].values())):.0%} of Redis "
                     f"CPU; Redis CPU {us:.0f} us/request (incl. idle ticks)")
        phases[phase]["total"] = total  # type: ignore[index]
    print("\n" + "\n".join(lines))
    miss, hit = phases["miss"]["total"], phases["hit"]["total"]  # type: ignore[index]
    # the miss path: the limiter's script, the lock taken and released (a script), the answer
    # cached and the output remembered (commandstats also counts what runs inside scripts)
    assert miss["evalsha"] >= n and miss["eval"] >= n and miss["set"] >= 3 * n
    # the hit path: batched reads only (a hit is not remembered: a redelivery hits again), and
    # the published marks (intake/marks.py): a ZADD per partition written to, one write every
    # 20 ms at most; a trim when its commit moved; its TTL set once an hour (so once per key here)
    marks = {"zadd", "zremrangebyscore", "expire"}
    assert {k for k, v in hit.items() if v} <= {"mget", "hello", "ping", "select", "replconf"} | marks
    partitions = 4  # Stack's requests topic
    for name, phase in (("miss", miss), ("hit", hit)):
        writes = elapsed[name] / 0.02 + 1
        assert 0 < phase["zadd"] <= partitions * writes, (phase, elapsed)
        assert phase["zremrangebyscore"] <= phase["zadd"], phase
    assert miss["expire"] <= partitions and hit["expire"] == 0, (miss, hit)
    if cluster:  # one MGET per slot: the id's and the answer's keys are in two slots
        assert 2 * n * 0.95 <= hit["mget"] <= 2 * n + 10
        assert len([p for p in ports if phases["miss"][p]]) == 3  # every shard takes its share
    else:  # one MGET per batch of requests read together
        assert hit["mget"] < n / 4


# ---- a master killed mid-run --------------------------------------------------------------------

_STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
RPM = 1200  # 20 requests/s across the group
WORKERS = 3


def _log_times(path: Path, text: str) -> list[float]:
    """Wall times of the worker's log lines holding ``text``."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if text in line and (m := _STAMP.search(line)):
            out.append(datetime.strptime(m.group(0), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


async def test_a_killed_master_loses_nothing_and_limits_hold(
    tmp_path: Path, redis_cluster: LocalCluster, mock_llm: StartMock
) -> None:
    mock = await mock_llm("--latency-ms", "20")
    stack = _stack(tmp_path, redis_cluster, [mock], rpm=RPM)
    stack.overrides["limits.local_fallback_fraction"] = 1 / WORKERS
    slot = key_slot(shared_tag(stack.config()["redis"]["key_prefix"]).encode())
    victim = redis_cluster.master_of(slot)
    n = 20 * 16  # ~16 s of the limit
    try:  # settle: the group rebalances
        async with running(stack, WORKERS, settle=3.0, clean_exit=False) as workers:
            async with Collector(stack) as col:
                await produce(stack.requests, encode(_doc(i, i) for i in range(n)))
                while (await mock.stats())["calls"] < 20 * 4:
                    await col.poll()
                killed_at = time.time()
                redis_cluster.kill(victim)
                promoted = await asyncio.to_thread(redis_cluster.wait_promoted, slot, victim)
                promoted_at = time.time()
                outs = await col.wait_for(n, timeout=180)
            stats = await mock.stats(log=True)
    finally:
        redis_cluster.start_node(victim)  # back as a replica of the promoted master
        redis_cluster.wait_ready()
    # nothing lost: every request answered once, each prompt called once
    bad = [o.value for o in outs if o.value.get("status") != "ok"]
    assert not bad, bad[:3]
    assert {o.value["id"] for o in outs} == {f"req-{i}" for i in range(n)}
    assert stats["calls"] == n and not stats["duplicate_prompts"]
    # when each worker left and rejoined the shared limiter
    down = [t for w in workers for t in _log_times(w.log, "redis unreachable for rate limits")]
    up = [t for w in workers for t in _log_times(w.log, "rate limits are shared across workers")]
    assert down, "no worker fell back to its local limiter: the kill was not felt"
    assert len(up) >= len(down), "a worker never rejoined the shared limiter"
    times = sorted(c["t"] for c in stats["calls_log"])
    stalls = [(a, b) for a, b in stats["stalls_log"]]  # the mock starved of CPU: not judged
    start, end = min(down + [killed_at]) - 1.0, max(up + [promoted_at]) + 1.0
    limit = RPM / 60
    warm = times[0] + CONNECT_WARMUP  # a worker's first call opens its connection: late
    calm = [t for t in times if warm <= t < start or t > end]
    around = [t for t in times if start <= t <= end]
    most_calm, _, judged = window_sums(calm, [1] * len(calm), 1.0, stalls)
    most_around, _, judged_around = window_sums(around, [1] * len(around), 1.0, stalls)
    reserved = limit / RATE_HEADROOM * RESERVE_AHEAD_SECONDS
    bound = 2 * limit + reserved + WORKERS  # README: the fallback's bound across a switch
    print(f"\nkilled {victim}, promoted {promoted} after {promoted_at - killed_at:.1f} s; "
          f"fallback {min(down) - killed_at:+.1f} s to {max(up) - killed_at:+.1f} s; max 1 s "
          f"window: {most_calm} calm, {most_around} around the failover (bound {bound:.0f}; "
          f"{judged:.0%} and {judged_around:.0%} judged, mock stalls {len(stalls)}), "
          f"limit {limit:.0f}")
    # as in test_rate_quota: a window touching a stall of the mock is not judged
    assert min(judged, judged_around) >= 0.5, "the mock stalled too often to measure (load?)"
    assert most_calm <= limit + SLACK
    assert most_around <= bound
