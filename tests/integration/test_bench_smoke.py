"""The benchmark harness still runs: a tiny miss-path run of llm-streams, and the floors' peers."""

from __future__ import annotations

import dataclasses
import os

import pytest

from bench.harness import Env
from bench.paced import paced_mock
from bench.procs import NGINX, Procs, free_port
from bench.scenarios import SIZES, cache_hit, miss_path


@pytest.mark.timeout(60)
@pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")
async def test_miss_path_smoke() -> None:
    procs = Procs()
    try:
        ports = [free_port(), free_port()]
        await procs.nginx(ports)
        env = Env(procs, [f"http://127.0.0.1:{p}/v1" for p in ports], SIZES["smoke"], peers=False, notes=[])
        result = await miss_path(env, n=300, peers=False)
    finally:
        procs.close()
    assert result["streams_completed"] == 300
    assert result["streams_ok"] == 300
    assert result["streams_rate"] > 0
    assert result["streams_cpu_per_req_us"] > 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")
async def test_cache_hit_with_bare_relay_and_probed_bare_pipeline() -> None:
    """The cache-hit floor (bare relay) answers every hit from the keys the harness seeds, and
    a probed bare pipeline at a slow mock reports the tail's figures."""
    procs = Procs()
    size = dataclasses.replace(SIZES["smoke"], hit_warm=20, hit_n=400)
    try:
        ports = [free_port(), free_port()]
        await procs.nginx(ports)
        env = Env(procs, [f"http://127.0.0.1:{p}/v1" for p in ports], size, peers=True, notes=[])
        hit = await cache_hit(env)
        slow = await paced_mock(env, "slowtest", 200, 0, 100, 2, 500, who="bare", probe=True)
    finally:
        procs.close()
    assert hit["completed"] == 400 and hit["hit_ratio"] == 1.0
    assert hit["relay_completed"] == 400 and hit["relay_hit_ratio"] == 1.0
    assert hit["ratio_vs_relay"] > 0
    assert slow["ok"] == slow["sent"] == 200
    assert slow["produce_requests"] > 0 and slow["fetches"] > 0
    assert slow["loop_lag_p50_ms"] is not None
    assert slow["redis_cmds_per_req"] < 0.1  # the bare pipeline does not use Redis
