"""The pipeline scenario: a pipeline on the miss path beside the native request path.

Both run one worker against the same two project mocks (``llm-streams mock-llm``, no added
latency; the mock, unlike nginx, answers ``response_format`` with a schema-valid object),
with the same concurrency (``limits.max_inflight``), the cache off and unique prompts. The
pipeline renders each event through its templates, asks for a JSON Schema answer, validates
it and writes enriched events; the native run sends plain requests. ``ratio`` is pipeline /
native throughput within the run (the issue's target: within 15 %, ratio >= 0.85).
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml

from bench import kafka_load as kl
from bench.harness import Env, endpoints, worker_config
from bench.harness import Run as _Run
from bench.harness import measure as _measure
from bench.harness import rate_of as _rate
from bench.procs import PY, ROOT, free_port
from streams.config import load_settings

# The shipped support-triage pipeline's schema (category enum, urgency 1-5, summary).
SCHEMA = load_settings(ROOT / "config" / "pipelines" / "support-triage.yaml",
                       environ={}).pipelines[0].output.schema_


def pipeline_config(topics: kl.Topics, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a native worker's) with one pipeline reading the run's requests topic."""
    pipe = {
        "name": "bench", "source": topics.requests, "sink": topics.responses,
        "dead_letter": topics.dlq, "group_id": topics.name, "model": "gpt-4o-mini",
        "id": "{{ event.id }}",
        "prompt": {"system": "Triage support tickets.",
                   "user": "Subject: {{ event.subject }}\n\n{{ event.body }}"},
        "output": {"format": "json", "schema": SCHEMA, "repair": 1, "field": "triage"},
    }
    topics_cfg = {**cfg["topics"], "requests": f"{topics.name}.native-unused"}
    return {**cfg, "topics": topics_cfg, "pipelines": [pipe]}


def events(n: int) -> list[bytes]:
    return [orjson.dumps({"id": f"pipe-{i}", "subject": f"ticket {i}",
                          "body": f"pipe unique prompt {i}"}) for i in range(n)]


async def _pipeline_worker(env: Env, run: _Run, cfg: dict[str, Any]) -> list[int]:
    port = free_port()
    cfg = {**cfg, "metrics": {"port": port, "host": "127.0.0.1"}}
    path = env.procs.tmp / f"pipeline-{run.topics.name}-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = env.procs.spawn([PY, "-m", "streams.tools.cli", "worker", "--config", str(path),
                            "--pipeline", "bench"], f"pipeline-{run.topics.name}-{port}.log")
    run.started.append(proc)
    await env.procs.worker_ready(proc, port)
    return [proc.pid]


async def _one(env: Env, urls: list[str], n: int, pipeline: bool) -> dict[str, Any]:
    async with _Run(env, "pipe" if pipeline else "native") as run:
        cfg = worker_config(run.topics, endpoints(urls), cache=False,
                            max_inflight=env.size.concurrency)
        if pipeline:
            pids = await _pipeline_worker(env, run, pipeline_config(run.topics, cfg))
            values = events(n)
        else:
            pids = await run.workers(cfg)
            values = kl.requests(n, "native")
        m = await _measure(run.topics, pids, values, timeout=max(60, n / 100))
    recs = m["records"]
    ok = [v for t, _, v in recs if t == run.topics.responses]
    return {"rate": _rate(m, recs), "cpu_per_req_us": m["cpu"] / max(1, len(recs)) * 1e6,
            "completed": len(recs), "ok": len(ok), "rss_peak_mb": m["rss_peak_mb"]}


async def pipeline_miss(env: Env) -> dict[str, Any]:
    """Pipeline vs native on the miss path: same mocks, same concurrency, cache off."""
    n = env.size.miss_n
    ports = [free_port(), free_port()]
    mocks = [await env.procs.mock(p) for p in ports]
    try:
        urls = [f"http://127.0.0.1:{p}/v1" for p in ports]
        native = await _one(env, urls, n, pipeline=False)
        piped = await _one(env, urls, n, pipeline=True)
    finally:
        for proc in mocks:
            env.procs.stop(proc)
    out = {f"native_{k}": v for k, v in native.items()}
    out.update({f"pipeline_{k}": v for k, v in piped.items()})
    if native["rate"] and piped["rate"]:
        out["ratio"] = piped["rate"] / native["rate"]
    return out
