"""BENCHMARKS.md and the JSON file from one harness run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.procs import QUIX_PY

FINDINGS = Path(__file__).with_name("FINDINGS.md")
BREAKDOWN = Path(__file__).with_name("BREAKDOWN.md")  # python -m bench.breakdown (make bench runs it first)

# Per scenario: title, what it does, and its rows (label, key, format).
TABLES: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "miss_path": (
        "1. Miss path (one worker, nginx upstream, cache off, unique prompts)",
        "Same concurrency for every peer; rates in requests/s, CPU in microseconds per request "
        "(utime+stime of the process doing the work). Ratios are llm-streams / peer within each run. "
        "(a) keeps up to the same number of calls in flight as the worker, publishes each answer as "
        "its call returns and commits each partition's lowest unfinished offset every second. "
        "(e) and (f) are Kafka apps like (a), measured from the first request produced to the last "
        "answer after 50 warm-up requests; (e) runs `max_workers` = the concurrency, which needs "
        "`ack_policy=ACK_FIRST` (at-most-once); (f) calls the upstream synchronously, one message "
        "at a time, as Quix Streams processes them; it runs from its own venv (`.venv-quix`: "
        "quixstreams pins an older pydantic than the worker's).",
        [("llm-streams worker: req/s", "streams_rate", "{:,.0f}"),
         ("llm-streams worker: CPU us/req", "streams_cpu_per_req_us", "{:,.0f}"),
         ("(a) bare pipeline (aiokafka {aiokafka} + aiohttp {aiohttp}): req/s", "bare_pipeline_rate", "{:,.0f}"),
         ("(a) bare pipeline: CPU us/req", "bare_pipeline_cpu_per_req_us", "{:,.0f}"),
         ("(b) bare aiohttp client, no Kafka: req/s", "client_rate", "{:,.0f}"),
         ("(b) bare client: CPU us/req", "client_cpu_per_req_us", "{:,.0f}"),
         ("(c) openai {openai} AsyncOpenAI: req/s", "openai_rate", "{:,.0f}"),
         ("(c) openai: CPU us/req", "openai_cpu_per_req_us", "{:,.0f}"),
         ("(d) LiteLLM {litellm} Router 3:1: req/s", "litellm_rate", "{:,.0f}"),
         ("(d) LiteLLM: CPU us/req", "litellm_cpu_per_req_us", "{:,.0f}"),
         ("(e) faststream {faststream} app + AsyncOpenAI (Kafka in and out): req/s", "faststream_rate", "{:,.0f}"),
         ("(e) faststream: CPU us/req", "faststream_cpu_per_req_us", "{:,.0f}"),
         ("(f) Quix Streams {quixstreams} app + OpenAI, one call at a time: req/s", "quix_rate", "{:,.0f}"),
         ("(f) Quix Streams: CPU us/req", "quix_cpu_per_req_us", "{:,.0f}"),
         ("ratio llm-streams / bare pipeline", "ratio_vs_bare_pipeline", "{:.2f}x"),
         ("ratio llm-streams / bare client", "ratio_vs_client", "{:.2f}x"),
         ("ratio llm-streams / openai", "ratio_vs_openai", "{:.1f}x"),
         ("ratio llm-streams / LiteLLM", "ratio_vs_litellm", "{:.1f}x"),
         ("ratio llm-streams / faststream", "ratio_vs_faststream", "{:.1f}x"),
         ("ratio llm-streams / Quix Streams", "ratio_vs_quix", "{:.1f}x")]),
    "cache_hit": (
        "2. Cache-hit path (one worker, cache pre-warmed, every request hits)",
        "The floor is a bare relay (`bench/bare_relay.py`): aiokafka getmany -> one Redis MGET per "
        "batch -> one produce per record carrying the cached body -> await the batch -> commit; no "
        "faust, no validation.",
        [("llm-streams: records/s", "rate", "{:,.0f}"),
         ("llm-streams: CPU us/record", "cpu_per_req_us", "{:,.0f}"),
         ("llm-streams: hit ratio", "hit_ratio", "{:.3f}"),
         ("bare relay: records/s", "relay_rate", "{:,.0f}"),
         ("bare relay: CPU us/record", "relay_cpu_per_req_us", "{:,.0f}"),
         ("ratio llm-streams / bare relay", "ratio_vs_relay", "{:.2f}x")]),
    "slow_upstream": (
        "3. Slow upstream (mock 1000 ms +- 500 ms, paced producer; at most 5,000 in flight)",
        "Four paced runs per run, each with a fresh mock: (1) the bare pipeline (`bench/bare_pipeline.py`, "
        "the same in-flight cap) and (2) one worker, each offered 5,000 req/s, for the highest rate "
        "each sustains (the floor and the ratio to it) and the worker's memory with 5,000 in flight; "
        "(3) the worker and (4) the bare pipeline offered 80 % of (1)'s rate, for the added latency "
        "below capacity and where its tail comes from. Added latency = the response's latency_ms "
        "(record timestamp to publish) minus the mock's own delay for that request (returned in the "
        "body under mock.latency_ms). The steady window runs from the first request + the mock's "
        "maximum delay + 0.5 s to the last request produced. Past capacity the excess queues in "
        "Kafka, so (2)'s added latency is the backlog's age. Peak outstanding = most requests "
        "produced but not yet answered at one time.",
        [("(1) bare pipeline: highest sustained req/s", "bare_rate", "{:,.0f}"),
         ("(2) worker: offered req/s", "offered_rate", "{:,.0f}"),
         ("(2) worker: highest sustained req/s (steady window)", "rate", "{:,.0f}"),
         ("(2) ratio worker / bare pipeline", "ratio_vs_bare", "{:.2f}x"),
         ("(2) worker: throughput req/s (first request to last answer)", "throughput", "{:,.0f}"),
         ("(2) peak outstanding", "peak_outstanding", "{:,.0f}"),
         ("(2) worker peak RSS MB", "rss_peak_mb", "{:,.0f}"),
         ("(2) added p99 ms (backlog)", "saturated_added_p99_ms", "{:,.0f}"),
         ("(3) offered req/s (80 % of (1))", "target_rate", "{:,.0f}"),
         ("(3) worker: sustained req/s", "target_sustained", "{:,.0f}"),
         ("(3) worker: added p50 ms", "added_p50_ms", "{:,.0f}"),
         ("(3) worker: added p99 ms", "added_p99_ms", "{:,.0f}"),
         ("(3) worker: requests not answered", "unanswered", "{:,.0f}"),
         ("(4) bare pipeline: added p50 ms", "bare_added_p50_ms", "{:,.0f}"),
         ("(4) bare pipeline: added p99 ms", "bare_added_p99_ms", "{:,.0f}")]),
    "slow_upstream_tail": (
        "3b. Where the tail comes from (runs (3) and (4), under `bench/probe.py`)",
        "Measured inside each process over the run's window by light hooks (`bench/probe.py`): "
        "event-loop lag = how late a 20 ms sleep on the main loop wakes (histogram buckets, so "
        "quantiles are bucket edges); GC = every collection timed through `gc.callbacks`; produce = "
        "aiokafka produce requests and the records in each; fetch = aiokafka fetches that returned "
        "records and the gap between them; Redis = INFO commandstats over the window, per request "
        "(scripts: the rate limiter's GCRA calls; no limit is configured here).",
        [(f"{who}: {label}", f"{key}_{k}", fmt) for who, key in (("worker", "streams"), ("bare", "bare"))
         for label, k, fmt in (
             ("loop lag p50 ms", "loop_lag_p50_ms", "{:,.0f}"), ("loop lag p99 ms", "loop_lag_p99_ms", "{:,.0f}"),
             ("loop lag mean ms", "loop_lag_mean_ms", "{:,.1f}"),
             ("share of loop samples > 50 ms late", "loop_lag_over_50ms", "{:.1%}"),
             ("GC ms in the window", "gc_ms", "{:,.0f}"), ("GC us per request", "gc_us_per_req", "{:,.0f}"),
             ("GC generation-2 collections", "gc_gen2", "{:,.0f}"),
             ("longest GC pause ms", "gc_max_ms", "{:,.0f}"),
             ("produce requests", "produce_requests", "{:,.0f}"),
             ("records per produce request", "records_per_produce", "{:,.1f}"),
             ("produce round trip ms", "produce_rtt_ms", "{:,.1f}"),
             ("records per fetch", "records_per_fetch", "{:,.1f}"),
             ("gap between fetches p50 ms", "fetch_gap_p50_ms", "{:,.0f}"),
             ("gap between fetches p99 ms", "fetch_gap_p99_ms", "{:,.0f}"),
             ("Redis commands per request", "redis_cmds_per_req", "{:,.2f}"),
             ("Redis script calls per request", "redis_scripts_per_req", "{:,.2f}"))]),
    "moderate_load": (
        "4. Added latency at moderate load (500 req/s paced, mock 100 ms fixed)",
        "",
        [("offered req/s", "offered_rate", "{:,.0f}"),
         ("sustained req/s (steady window)", "rate", "{:,.0f}"),
         ("added p50 ms", "added_p50_ms", "{:,.1f}"), ("added p99 ms", "added_p99_ms", "{:,.1f}"),
         ("worker peak RSS MB", "rss_peak_mb", "{:,.0f}")]),
    "two_workers": (
        "5. One vs two workers (miss path, same group)",
        "",
        [("one worker req/s", "one_rate", "{:,.0f}"), ("two workers req/s", "two_rate", "{:,.0f}"),
         ("scaling two / one", "scaling", "{:.2f}x"),
         ("one worker CPU us/req", "one_cpu_per_req_us", "{:,.0f}"),
         ("two workers CPU us/req (both)", "two_cpu_per_req_us", "{:,.0f}")]),
    "priority": (
        "6. Priority under saturation (limits.max_requests_per_second, priorities 0 and 9 at 2x the limit)",
        "Wait = latency_ms (record timestamp to publish); the upstream is nginx (near-free).",
        [("limit req/s", "limit_rps", "{:,.0f}"), ("offered req/s", "offered_rate", "{:,.0f}"),
         ("served req/s (steady window)", "rate", "{:,.0f}"),
         ("served / limit (target >= 97 %)", "share_of_limit", "{:.1%}"),
         ("priority 0 median wait ms", "p0_wait_p50_ms", "{:,.0f}"),
         ("priority 9 median wait ms", "p9_wait_p50_ms", "{:,.0f}"),
         ("priority 0 p99 wait ms", "p0_wait_p99_ms", "{:,.0f}"),
         ("priority 9 p99 wait ms", "p9_wait_p99_ms", "{:,.0f}")]),
    "pipeline_miss": (
        "7. Pipeline vs native miss path (one worker each, the project's mock, cache off)",
        "Same two mocks (no added latency) and the same concurrency for both; the pipeline renders "
        "its templates, asks for a JSON Schema answer, validates it and writes enriched events. "
        "Ratio = pipeline / native req/s within the run.",
        [("native requests: req/s", "native_rate", "{:,.0f}"),
         ("native: CPU us/req", "native_cpu_per_req_us", "{:,.0f}"),
         ("pipeline events: req/s", "pipeline_rate", "{:,.0f}"),
         ("pipeline: CPU us/req", "pipeline_cpu_per_req_us", "{:,.0f}"),
         ("pipeline events enriched", "pipeline_ok", "{:,.0f}"),
         ("ratio pipeline / native", "ratio", "{:.2f}x")]),
    "embeddings": (
        "8. Embeddings batched across records (mock 20 ms per /embeddings call, one worker)",
        "Records answered per second, unique inputs, cache off: batching (the `embeddings` "
        "defaults) vs one call per record (`embeddings.max_batch_inputs: 1`), with the endpoint "
        "at `max_concurrency: 4` and without a cap.",
        [("max_concurrency 4, batched: records/s", "cap4_batched_rate", "{:,.0f}"),
         ("max_concurrency 4, batched: mean inputs per call", "cap4_batched_mean_batch", "{:,.0f}"),
         ("max_concurrency 4, one per call: records/s", "cap4_single_rate", "{:,.0f}"),
         ("max_concurrency 4: ratio batched / one per call", "cap4_ratio", "{:.1f}x"),
         ("no cap, batched: records/s", "nocap_batched_rate", "{:,.0f}"),
         ("no cap, batched: mean inputs per call", "nocap_batched_mean_batch", "{:,.0f}"),
         ("no cap, one per call: records/s", "nocap_single_rate", "{:,.0f}"),
         ("no cap: ratio batched / one per call", "nocap_ratio", "{:.1f}x"),
         ("batched: worker CPU us/record (no cap)", "nocap_batched_cpu_per_req_us", "{:,.0f}")]),
}

# Tables that show figures of another scenario's runs.
SOURCE = {"slow_upstream_tail": "slow_upstream"}

# (scenario, key, comparison, threshold, description)
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("cache_hit", "rate", ">=", 10_000, "cache-hit >= 10,000 records/s per worker"),
    ("cache_hit", "ratio_vs_relay", ">=", 0.7, "cache-hit >= 0.7x the bare relay"),
    ("miss_path", "ratio_vs_bare_pipeline", ">=", 0.95, "miss path >= 0.95x bare pipeline"),
    ("miss_path", "ratio_vs_litellm", ">=", 10, "miss path >= 10x LiteLLM Router"),
    ("slow_upstream", "ratio_vs_bare", ">=", 0.9, "slow upstream: sustained at 5,000 offered >= 0.9x bare pipeline"),  # noqa: E501
    ("slow_upstream", "added_p99_ms", "<=", 150, "slow upstream: p99 added at 80 % of bare's rate <= 150 ms"),
    ("slow_upstream", "unanswered", "<=", 0, "slow upstream: every request answered at 80 % of bare's rate"),
    ("slow_upstream", "rss_peak_mb", "<=", 300, "slow upstream: worker RSS <= 300 MB with 5,000 in flight"),
    ("slow_upstream", "peak_outstanding", ">=", 5_000, "slow upstream measured with 5,000 in flight"),
    ("moderate_load", "added_p50_ms", "<=", 10, "500 req/s: p50 added <= 10 ms"),
    ("moderate_load", "added_p99_ms", "<=", 50, "500 req/s: p99 added <= 50 ms"),
    ("priority", "share_of_limit", ">=", 0.97, "priority: served >= 97 % of the global limit"),
    ("pipeline_miss", "ratio", ">=", 0.85, "pipeline miss path within 15% of native"),
    ("embeddings", "cap4_ratio", ">=", 10, "embeddings at max_concurrency 4: >= 10x one call per record"),
]


def _versions_in(python: str, pkgs: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of packages in another interpreter's environment (the Quix Streams peer's venv)."""
    code = ("import json, importlib.metadata as m\n"
            "def v(p):\n try: return m.version(p)\n except m.PackageNotFoundError: return None\n"
            f"print(json.dumps({{p: v(p) for p in {list(pkgs)!r}}}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30).stdout
        got: dict[str, str | None] = json.loads(out)
        return got
    except (OSError, subprocess.SubprocessError, ValueError):
        return dict.fromkeys(pkgs)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except OSError:
        mem_kb = 0
    versions: dict[str, str | None] = {}
    for pkg in ("faust-streaming", "aiokafka", "aiohttp", "redis", "pydantic", "openai", "litellm",
                "faststream", "uvloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions.update(_versions_in(QUIX_PY, ("quixstreams", "confluent-kafka")))
    try:
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=5).stderr.strip()
    except (OSError, subprocess.SubprocessError):
        nginx = None
    return {"nproc": os.cpu_count(), "cpu_model": model, "ram_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(), "nginx": nginx,
            "packages": versions}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for scen, key, op, threshold, desc in TARGETS:
        s = (results.get(scen) or {}).get("summary", {}).get(key)
        value = s["median"] if s else None
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"target": desc, "scenario": scen, "key": key, "op": op, "threshold": threshold,
                    "median": value, "met": met})
    return out


def _cell(s: dict[str, Any] | None, fmt: str) -> tuple[str, str]:
    if not s:
        return "n/a", ""
    med = fmt.format(s["median"])
    if s["runs"] > 1:
        return med, f"{fmt.format(s['min'])} – {fmt.format(s['max'])}"
    return med, "(1 run)"


class _Versions(dict[str, str]):
    """Package versions for the row labels ("{faststream}"); "?" for one not installed."""

    def __missing__(self, key: str) -> str:
        return "?"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    versions = _Versions({k.replace("-", "_"): v for k, v in m["packages"].items() if v})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{doc['command']}` (size `{doc['size']}`, {doc['runs']} run(s) per scenario; "
        "figures are the median with the min – max spread over the runs).",
        "",
        "## Machine",
        "",
        f"- `nproc`: {m['nproc']}; CPU: {m['cpu_model']}; RAM: {m['ram_gb']} GB; kernel {m['kernel']}",
        f"- Python {m['python']}; {m['nginx']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        "- Kafka (single KRaft broker) and Redis on 127.0.0.1; every process of the benchmark "
        "shares the same cores, so absolute figures are for this machine only: compare within a run.",
        "",
        "## Commands",
        "",
        "```sh",
        "pip install -e '.[dev,bench]'   # the peers: openai, litellm, faststream (make bench adds .venv-quix)",
        "make bench          # python -m bench.breakdown, then bench.run --size full --out BENCHMARKS.md",
        "make bench-smoke    # python -m bench.run --size smoke (tiny sizes, about 2 minutes)",
        "make bench-compare A=REV B=REV  # python -m bench.run --compare A B --scenarios miss,hit --size full",
        "python -m bench.profile SCENARIO --set FIELD=VALUE   # py-spy on the worker during one run",
        "python -m bench.breakdown [--paths miss,hit,slow]   # CPU per request by library, worker and floor",
        "python -m bench.inproc --redis-url URL [--cache] [--batch N --stream]   # CPU per miss in one process",
        "```",
        "",
        "Stand-ins: nginx (`return 200 '<fixed chat.completion JSON>'`) on two ports, used as two "
        "endpoints weighted 3:1 by llm-streams, the bare peers and the LiteLLM Router; the project's "
        "mock (`llm-streams mock-llm --latency-ms ...`) for the slow and moderate scenarios. "
        "`--compare` checks both commits out with `git worktree` and runs their workers alternately "
        "against the same stand-ins, writing bench/COMPARE.md.",
        "",
        "## Targets",
        "",
        "| target | median | met |",
        "| --- | --- | --- |",
    ]
    for t in doc["targets"]:
        med = "n/a" if t["median"] is None else f"{t['median']:,.2f}"
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {med} | {met} |")
    if doc["size"] != "full":
        lines += ["", f"_Size `{doc['size']}`: loads are tiny, so these verdicts are indicative only._"]
    for name, (title, text, rows) in TABLES.items():
        res = doc["scenarios"].get(SOURCE.get(name, name))
        if res is None:
            continue
        lines += ["", f"## {title}", ""]
        if text:
            lines += [text, ""]
        lines += ["| | median | min – max |", "| --- | --- | --- |"]
        for label, key, fmt in rows:
            med, rng = _cell(res["summary"].get(key), fmt)
            lines.append(f"| {label.format_map(versions)} | {med} | {rng} |")
        for err in res.get("errors", []) if name not in SOURCE else []:
            lines.append(f"\nrun failed: `{err}`")
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    if BREAKDOWN.exists() and doc["size"] == "full":
        lines += ["", "## Where a request's CPU goes, by library, against its floor", "",
                  "`python -m bench.breakdown` (its docstring says how): each path's worker and floor "
                  "under `py-spy record --gil` over the measured window, with the same stand-ins and "
                  "sizes as above (the slow path paced at 2,000 req/s, which both sustain). py-spy's "
                  "sampling raises CPU per request by a few per cent. The largest differences first.",
                  "", BREAKDOWN.read_text().rstrip()]
    if FINDINGS.exists():  # hand-written: what the profiles show, kept next to the figures
        lines += ["", FINDINGS.read_text().rstrip()]
    return "\n".join(lines) + "\n"
