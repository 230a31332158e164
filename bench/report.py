"""BENCHMARKS.md and the JSON file from one harness run."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

FINDINGS = Path(__file__).with_name("FINDINGS.md")

# Per scenario: title, what it does, and its rows (label, key, format).
TABLES: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "miss_path": (
        "1. Miss path (one worker, nginx upstream, cache off, unique prompts)",
        "Same concurrency for every peer; rates in requests/s, CPU in microseconds per request "
        "(utime+stime of the process doing the work). Ratios are llm-streams / peer within each run.",
        [("llm-streams worker: req/s", "streams_rate", "{:,.0f}"),
         ("llm-streams worker: CPU us/req", "streams_cpu_per_req_us", "{:,.0f}"),
         ("(a) bare pipeline (aiokafka+aiohttp): req/s", "bare_pipeline_rate", "{:,.0f}"),
         ("(a) bare pipeline: CPU us/req", "bare_pipeline_cpu_per_req_us", "{:,.0f}"),
         ("(b) bare aiohttp client, no Kafka: req/s", "client_rate", "{:,.0f}"),
         ("(b) bare client: CPU us/req", "client_cpu_per_req_us", "{:,.0f}"),
         ("(c) openai AsyncOpenAI: req/s", "openai_rate", "{:,.0f}"),
         ("(c) openai: CPU us/req", "openai_cpu_per_req_us", "{:,.0f}"),
         ("(d) LiteLLM Router 3:1: req/s", "litellm_rate", "{:,.0f}"),
         ("(d) LiteLLM: CPU us/req", "litellm_cpu_per_req_us", "{:,.0f}"),
         ("ratio llm-streams / bare pipeline", "ratio_vs_bare_pipeline", "{:.2f}x"),
         ("ratio llm-streams / bare client", "ratio_vs_client", "{:.2f}x"),
         ("ratio llm-streams / openai", "ratio_vs_openai", "{:.1f}x"),
         ("ratio llm-streams / LiteLLM", "ratio_vs_litellm", "{:.1f}x")]),
    "cache_hit": (
        "2. Cache-hit path (one worker, cache pre-warmed, every request hits)",
        "",
        [("records/s", "rate", "{:,.0f}"), ("CPU us/record", "cpu_per_req_us", "{:,.0f}"),
         ("hit ratio", "hit_ratio", "{:.3f}")]),
    "slow_upstream": (
        "3. Slow upstream (mock 1000 ms +- 500 ms, paced producer; one worker)",
        "Two paced runs per run: (a) at the target rate, for the added latency at that rate; (b) at "
        "5,000 req/s offered (5,000 in flight), for the highest rate the worker sustains and its "
        "memory. Added latency = the response's latency_ms (record timestamp to publish) minus the "
        "mock's own delay for that request (returned in the body under mock.latency_ms). Peak "
        "outstanding = most requests produced but not yet answered at one time. The steady window "
        "runs from the first request + the mock's maximum delay + 0.5 s to the last request "
        "produced. Past capacity (b) the excess queues in Kafka, so (b)'s added latency is the "
        "backlog's age, not the worker's overhead.",
        [("(a) offered req/s", "target_rate", "{:,.0f}"),
         ("(a) sustained req/s (steady window)", "target_sustained", "{:,.0f}"),
         ("(a) added p50 ms", "added_p50_ms", "{:,.0f}"),
         ("(a) added p99 ms", "added_p99_ms", "{:,.0f}"),
         ("(b) offered req/s", "offered_rate", "{:,.0f}"),
         ("(b) highest sustained req/s (steady window)", "rate", "{:,.0f}"),
         ("(b) throughput req/s (first request to last answer)", "throughput", "{:,.0f}"),
         ("(b) peak outstanding", "peak_outstanding", "{:,.0f}"),
         ("(b) added p50 ms (backlog)", "saturated_added_p50_ms", "{:,.0f}"),
         ("(b) added p99 ms (backlog)", "saturated_added_p99_ms", "{:,.0f}"),
         ("requests sent (a + b)", "sent", "{:,.0f}"), ("answered ok (a + b)", "ok", "{:,.0f}"),
         ("worker peak RSS MB (a, b)", "rss_peak_mb", "{:,.0f}")]),
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
         ("served / limit", "share_of_limit", "{:.1%}"),
         ("priority 0 median wait ms", "p0_wait_p50_ms", "{:,.0f}"),
         ("priority 9 median wait ms", "p9_wait_p50_ms", "{:,.0f}"),
         ("priority 0 p99 wait ms", "p0_wait_p99_ms", "{:,.0f}"),
         ("priority 9 p99 wait ms", "p9_wait_p99_ms", "{:,.0f}")]),
    "embeddings": (
        "7. Embeddings batched across records (mock 20 ms per /embeddings call, one worker)",
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

# (scenario, key, comparison, threshold, description)
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("cache_hit", "rate", ">=", 10_000, "cache-hit >= 10,000 records/s per worker"),
    ("miss_path", "ratio_vs_bare_pipeline", ">=", 0.6, "miss path >= 0.6x bare pipeline"),
    ("miss_path", "ratio_vs_litellm", ">=", 10, "miss path >= 10x LiteLLM Router"),
    ("slow_upstream", "rate", ">=", 2_500, "slow upstream >= 2,500 req/s sustained"),
    ("slow_upstream", "target_sustained", ">=", 2_450, "slow upstream: 2,500 req/s offered, served"),
    ("slow_upstream", "added_p99_ms", "<=", 250, "slow upstream p99 added at 2,500 req/s <= 250 ms"),
    ("slow_upstream", "rss_peak_mb", "<=", 400, "slow upstream worker RSS <= 400 MB"),
    ("slow_upstream", "peak_outstanding", ">=", 5_000, "slow upstream measured with 5,000 in flight"),
    ("moderate_load", "added_p50_ms", "<=", 10, "500 req/s: p50 added <= 10 ms"),
    ("moderate_load", "added_p99_ms", "<=", 50, "500 req/s: p99 added <= 50 ms"),
    ("priority", "share_of_limit", ">=", 0.97, "priority: served >= 97% of the rate limit"),
    ("embeddings", "cap4_ratio", ">=", 10, "embeddings at max_concurrency 4: >= 10x one call per record"),
]


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
    versions = {}
    for pkg in ("faust-streaming", "aiokafka", "aiohttp", "openai", "litellm", "uvloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
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


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
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
        "pip install -e '.[dev,bench]'   # openai and litellm for the peers",
        "make bench          # python -m bench.run --size full --out BENCHMARKS.md --json bench/results.json",
        "make bench-smoke    # python -m bench.run --size smoke (tiny sizes, < 2 minutes)",
        "```",
        "",
        "Stand-ins: nginx (`return 200 '<fixed chat.completion JSON>'`) on two ports, used as two "
        "endpoints weighted 3:1 by llm-streams, the bare peers and the LiteLLM Router; the project's "
        "mock (`llm-streams mock-llm --latency-ms ...`) for the slow and moderate scenarios.",
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
        res = doc["scenarios"].get(name)
        if res is None:
            continue
        lines += ["", f"## {title}", ""]
        if text:
            lines += [text, ""]
        lines += ["| | median | min – max |", "| --- | --- | --- |"]
        for label, key, fmt in rows:
            med, rng = _cell(res["summary"].get(key), fmt)
            lines.append(f"| {label} | {med} | {rng} |")
        for err in res.get("errors", []):
            lines.append(f"\nrun failed: `{err}`")
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    if FINDINGS.exists():  # hand-written: what the profiles show, kept next to the figures
        lines += ["", FINDINGS.read_text().rstrip()]
    return "\n".join(lines) + "\n"
