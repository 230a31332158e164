"""The benchmark harness still runs: one tiny miss-path run of llm-streams, no peers."""

from __future__ import annotations

import os

import pytest

from bench.harness import Env
from bench.procs import NGINX, Procs, free_port
from bench.scenarios import SIZES, miss_path


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
