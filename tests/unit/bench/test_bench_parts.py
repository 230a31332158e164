"""The benchmark harness's own arithmetic: the probe's windows, the bare pipeline's commit
offsets, Redis commands per request, the side-by-side report and the targets table."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from bench import compare, probe, report
from bench.bare_pipeline import Offsets
from bench.harness import redis_per_request


def _state(**over: Any) -> dict[str, Any]:
    n = len(probe.LAG_BUCKETS_MS)
    doc: dict[str, Any] = {
        "lag_hist": [0] * n, "lag_max_ms": 0.0, "lag_sum_ms": 0.0,
        "gc_count": [0, 0, 0], "gc_ms": [0.0, 0.0, 0.0], "gc_max_ms": [0.0, 0.0, 0.0],
        "produce_requests": 0, "produce_records": 0, "produce_ms": 0.0,
        "fetches": 0, "fetch_records": 0, "fetch_gap_hist": [0] * n, "fetch_gap_max_ms": 0.0,
    }
    doc.update(over)
    return doc


def test_probe_window_is_the_difference_of_two_snapshots() -> None:
    n = len(probe.LAG_BUCKETS_MS)
    lag0, lag1 = [0] * n, [0] * n
    lag0[0] = 500  # before the window: all on time
    lag1[0] = 500 + 98  # in the window: 98 on time (<= 1 ms), one at 50 ms, one at 200 ms
    lag1[probe.LAG_BUCKETS_MS.index(50)] = 1
    lag1[probe.LAG_BUCKETS_MS.index(200)] = 1
    before = _state(lag_hist=lag0, gc_ms=[1.0, 0.0, 0.0], produce_requests=10, produce_records=10)
    after = _state(lag_hist=lag1, lag_sum_ms=250.0, gc_count=[4, 1, 1], gc_ms=[3.0, 2.0, 6.0],
                   gc_max_ms=[1.0, 2.0, 6.0], produce_requests=30, produce_records=110, produce_ms=40.0)
    w = probe.window(before, after, answered=100)
    assert w["loop_lag_p50_ms"] == 1
    assert w["loop_lag_p99_ms"] == 50
    assert w["loop_lag_over_50ms"] == 0.01
    assert w["loop_lag_mean_ms"] == 2.5
    assert w["gc_ms"] == 10.0 and w["gc_us_per_req"] == 100.0 and w["gc_gen2"] == 1
    assert w["gc_max_ms"] == 6.0
    assert w["produce_requests"] == 20 and w["records_per_produce"] == 5.0
    assert w["produce_rtt_ms"] == 2.0
    assert probe.window(before, None, 100) == {}


def test_probe_lag_sampler_sees_a_blocked_loop() -> None:
    probe.STATE["lag_hist"] = [0] * len(probe.LAG_BUCKETS_MS)
    probe.STATE["lag_max_ms"] = 0.0

    async def go() -> None:
        task = asyncio.create_task(probe._lag_sampler())
        await asyncio.sleep(0.05)
        time.sleep(0.12)  # blocks the loop: the sampler wakes ~120 ms late
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(go())
    assert probe.STATE["lag_max_ms"] >= 100
    assert sum(probe.STATE["lag_hist"][probe.LAG_BUCKETS_MS.index(150):]) >= 1


def test_bare_pipeline_commits_the_lowest_unfinished_offset() -> None:
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    offsets = Offsets()
    entries = [offsets.add(tp, o) for o in range(10, 15)]
    last = offsets.add(other, 7)
    entries[1][1] = entries[2][1] = 1  # 11 and 12 finish before 10
    assert offsets.committable()[tp].offset == 10
    entries[0][1] = 1
    assert offsets.committable()[tp].offset == 13
    entries[3][1] = entries[4][1] = 1
    last[1] = 1
    got = offsets.committable()
    assert got[tp].offset == 15 and got[other].offset == 8


def test_redis_per_request_counts_scripts_apart() -> None:
    before = {"get": 10, "evalsha": 5, "info": 3}
    after = {"get": 110, "evalsha": 55, "mget": 50, "info": 9}
    got = redis_per_request(before, after, answered=50)
    assert got == {"redis_cmds_per_req": 4.0, "redis_scripts_per_req": 1.0}
    assert redis_per_request(before, {}, 50) == {}


def test_compare_report_gives_both_ratios() -> None:
    runs_a = [{"rate": 100.0}, {"rate": 200.0}]
    runs_b = [{"rate": 110.0}, {"rate": 180.0}]
    summ = [{"rate": {"median": 150.0, "min": 100.0, "max": 200.0, "runs": 2}},
            {"rate": {"median": 145.0, "min": 110.0, "max": 180.0, "runs": 2}}]
    doc = {"command": "python -m bench.run --compare a b", "size": "smoke", "runs": 2,
           "revisions": ["a (1)", "b (2)"],
           "scenarios": {"miss": {"runs": [runs_a, runs_b], "summary": summ, "errors": []}}}
    md = compare.markdown(doc)
    assert "| req/s | 150 (100 – 200) | 145 (110 – 180) | 0.97 | 1.00 (0.90 – 1.10) |" in md
    assert "| CPU us/req | n/a | n/a | n/a | n/a |" in md


def test_targets_table_reads_the_new_slow_upstream_figures() -> None:
    def summary(**vals: float) -> dict[str, Any]:
        return {"summary": {k: {"median": v, "min": v, "max": v, "runs": 1} for k, v in vals.items()}}

    results = {"slow_upstream": summary(ratio_vs_bare=0.85, added_p99_ms=120, unanswered=0, rss_peak_mb=310),
               "priority": summary(share_of_limit=0.975)}
    met = {(t["scenario"], t["key"]): t["met"] for t in report.evaluate(results)}
    assert met[("slow_upstream", "ratio_vs_bare")] is False
    assert met[("slow_upstream", "added_p99_ms")] is True
    assert met[("slow_upstream", "unanswered")] is True
    assert met[("slow_upstream", "rss_peak_mb")] is False
    assert met[("priority", "share_of_limit")] is True
    assert met[("cache_hit", "ratio_vs_relay")] is None


def test_tables_show_the_slow_upstream_tail_and_peer_versions() -> None:
    one = {"median": 15.0, "min": 15.0, "max": 15.0, "runs": 1}
    doc = {"command": "python -m bench.run", "size": "smoke", "runs": 1, "notes": [], "targets": [],
           "machine": {"nproc": 2, "cpu_model": "x", "ram_gb": 1, "kernel": "k", "python": "3",
                       "nginx": "n", "packages": {"quixstreams": "3.1", "faststream": None}},
           "scenarios": {"slow_upstream": {"runs": [], "errors": ["boom"],
                                           "summary": {"streams_loop_lag_p99_ms": one}},
                         "miss_path": {"runs": [], "errors": [], "summary": {"quix_rate": one}}}}
    md = report.markdown(doc)
    assert "| (f) Quix Streams 3.1 app + OpenAI, one call at a time: req/s | 15 | (1 run) |" in md
    assert "| (e) faststream ? app" in md  # a peer's package that is not installed
    assert "| worker: loop lag p99 ms | 15 | (1 run) |" in md
    assert md.count("run failed: `boom`") == 1  # under the scenario's own table only


def test_a_full_report_carries_the_breakdown_and_a_smoke_one_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    breakdown = tmp_path / "BREAKDOWN.md"
    breakdown.write_text("### breakdown-marker-7\n")
    monkeypatch.setattr(report, "BREAKDOWN", breakdown)
    doc: dict[str, Any] = {"command": "python -m bench.run", "runs": 1, "notes": [], "targets": [],
                           "machine": {"nproc": 2, "cpu_model": "x", "ram_gb": 1, "kernel": "k",
                                       "python": "3", "nginx": "n", "packages": {}},
                           "scenarios": {}}
    assert "### breakdown-marker-7" in report.markdown({**doc, "size": "full"})
    assert "### breakdown-marker-7" not in report.markdown({**doc, "size": "smoke"})


def test_every_bench_module_imports() -> None:
    """Scenarios import their modules lazily: a moved helper must fail here, not in `make bench`."""
    import importlib
    import pkgutil

    import bench

    for mod in pkgutil.iter_modules(bench.__path__):
        importlib.import_module(f"bench.{mod.name}")
