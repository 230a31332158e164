"""The monitoring files of docker/ checked by a real Prometheus (Debian's package, installed by
``scripts/stack.sh setup``): its promtool checks and unit-tests the alerting rules, and a
Prometheus started here with the project's scrape config scrapes a worker under load (real
broker, Redis and mock endpoints) and evaluates every query of the Grafana dashboard. Each must
parse, and each must return data unless it is in ``MAY_BE_EMPTY`` below, so a renamed metric
or a broken query fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.integration.harness import (
    Collector,
    Mock,
    Stack,
    Worker,
    encode,
    produce,
    request,
    running,
    wait_http,
)
from tests.integration.servers import ROOT, free_port
from tests.unit.test_docker import _exported_series

PROM = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "llm-streams.json"

# Queries that may return nothing under this test's load, each with the reason. Anything else
# must return data.
MAY_BE_EMPTY = {
    "llm_streams_cache_errors_total": "only Redis errors count here; the load has no outage "
                                      "(tests/unit/test_cache.py covers them on a fake Redis)",
    "llm_streams_cache_coalesce_fallbacks_total": "only when a coalescing leader fails or "
                                                  "stalls, which the mock never does here",
    "llm_streams_cache_skipped_writes_total": "only for answers over cache.max_value_bytes or "
                                              "not serializable, or during a Redis outage: the "
                                              "mock's answers are small and valid",
    **dict.fromkeys(
        ("llm_streams_batch_parked_total", "llm_streams_batch_answered_total",
         "llm_streams_batch_fallbacks_total", "llm_streams_batch_late_results_dropped_total",
         "llm_streams_batch_jobs_finished_total", "llm_streams_batch_requests_per_job_bucket",
         "llm_streams_batch_cost_saved_total"),
        "work that can wait: only with batch_api enabled (tests/integration/test_batch_api.py)"),
}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: run scripts/stack.sh setup"
    return path


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def _alerts(rules: dict[str, Any]) -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_checks_the_config_and_the_alerting_rules() -> None:
    check = promtool("check", "config", "prometheus.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = _alerts(yaml.safe_load((PROM / "alerts.yml").read_text()))
    assert {"ConsumerLagGrowing", "DeadLetterRateHigh", "EndpointCoolingDownLong",
            "CacheCircuitOpen", "NoPartitionsAssigned"} <= set(alerts)
    exported = set().union(*_exported_series().values())
    for name, expr in alerts.items():
        used = set(re.findall(r"\bllm_streams_[a-z0-9_]+", expr))
        assert used and used <= exported, f"{name} reads series no worker exports: {used - exported}"


def test_every_alert_has_a_unit_test_that_sees_it_fire(tmp_path: Path) -> None:
    """An alert whose expression can never fire fails alerts.test.yml: each test can fail."""
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    shutil.copy(PROM / "alerts.test.yml", tmp_path)
    for name in _alerts(rules):
        broken = json.loads(json.dumps(rules))
        for group in broken["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == name:
                    rule["expr"] = "vector(1) == 2"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken))
        run = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
        assert run.returncode != 0 and f"alertname: {name}," in run.stdout + run.stderr, name


@dataclass
class Prometheus:
    """``prometheus`` on a free port of 127.0.0.1 with the project's config, its scrape
    targets replaced by local ones, scraping and evaluating rules every second."""

    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, targets: list[str]) -> None:
        cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        cfg["rule_files"] = [str(PROM / f) for f in cfg["rule_files"]]
        [job] = cfg["scrape_configs"]
        job["static_configs"] = [{"targets": targets}]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        with (self.dir / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, params=params) as r:
            body: dict[str, Any] = await r.json()
            return body

    async def query(self, expr: str) -> dict[str, Any]:
        return await self.get("/api/v1/query", query=expr)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus")
    try:
        yield server
    finally:
        server.stop()


def _queries() -> list[tuple[str, str]]:
    """(panel title and refId, query as Grafana sends it with "All" workers selected)."""
    doc = json.loads(DASHBOARD.read_text())
    found = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m")
            found.append((f"{panel['title']} {target['refId']}", expr))
    return found


async def _load(stack: Stack, mocks: list[Mock]) -> None:
    """Traffic that exercises every panel: answers, cache hits, coalesced twins, an
    idempotent replay, dead letters, upstream errors with retries, a rate limit, embeddings."""
    await mocks[1].configure(error_rate=0.3, status_on_error=500)
    first = [request(i) for i in range(40)]
    first += [request(i, input="the same prompt") for i in range(40, 46)]  # coalesced
    first += [request(i, kind="embedding") for i in range(200, 210)]  # batched embeddings
    await produce(stack.requests, [*encode(first), b"not json", b'{"id": "bad"}'],
                  bootstrap=stack.kafka)
    async with Collector(stack) as col:
        await col.wait_for(58, timeout=90)
        again = [request(i, input=f"prompt number {i - 100}") for i in range(100, 110)]  # hits
        await produce(stack.requests, encode([*again, request(0)]), bootstrap=stack.kafka)
        await col.wait_for(68, timeout=60)


PIPELINE = "mon"


def _with_pipeline(stack: Stack) -> str:
    source = f"it-{stack.name}.events"
    stack.overrides["pipelines"] = [{
        "name": PIPELINE, "source": source, "sink": f"{source}.enriched", "model": "gpt-4o-mini",
        "prompt": {"user": "{{ event.text }}"},
        "output": {"format": "json", "schema": {"type": "object", "required": ["label"],
                                                "properties": {"label": {"type": "string"}}}},
    }]
    return source


async def _pipeline_load(stack: Stack, mocks: list[Mock], piped: Worker, source: str) -> None:
    """Enriched events, repairs of invalid answers, template dead letters."""
    for m in mocks:
        await m.configure(invalid_share=0.4)
    docs = [{"text": f"event {i}"} if i % 5 else {"no_text": i} for i in range(30)]
    await produce(source, encode(docs), bootstrap=stack.kafka)
    deadline = time.monotonic() + 90
    while await piped.metric("llm_streams_pipeline_outputs_total") < len(docs):
        assert time.monotonic() < deadline, "the pipeline's events were not all finished"
        await asyncio.sleep(0.5)


async def _wait_for_data(prom: Prometheus, queries: list[tuple[str, str]],
                         timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Every query's last answer, once all that must have data have it (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        answers = {name: await prom.query(expr) for name, expr in queries}
        missing = [name for name, expr in queries if not _may_be_empty(expr)
                   and not answers[name].get("data", {}).get("result")]
        if not missing or time.monotonic() > deadline:
            return answers
        await asyncio.sleep(1)


def _may_be_empty(expr: str) -> bool:
    return bool(set(re.findall(r"\bllm_streams_[a-z0-9_]+", expr)) & MAY_BE_EMPTY.keys())


async def test_prometheus_evaluates_every_dashboard_query_on_a_loaded_worker(
    stack: Stack, mocks: list[Mock], prometheus: Prometheus
) -> None:
    stack.endpoints[0]["rpm"] = 600  # 10/s on mock-a: the limiter refuses some
    # prices and a budget (that never binds) for the cost row's panels
    stack.overrides["pricing"] = {"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}
    stack.overrides["tenants"] = {"default": {"budgets": [{"window": "day", "tokens": 10**9}]}}
    source = _with_pipeline(stack)
    async with running(stack) as [worker], \
            running(stack, args=("--pipeline", PIPELINE)) as [piped]:  # the Pipelines row's data
        prometheus.start([f"127.0.0.1:{worker.metrics_port}", f"127.0.0.1:{piped.metrics_port}"])
        await wait_http(f"{prometheus.url}/-/ready", timeout=60)
        await _load(stack, mocks)
        await _pipeline_load(stack, mocks, piped, source)
        queries = _queries()
        answers = await _wait_for_data(prometheus, queries)
        exposed = await _exposed_series(worker) | await _exposed_series(piped)

    bad = {n: a for n, a in answers.items() if a.get("status") != "success"}
    assert not bad, f"queries Prometheus refused: {bad}"
    empty = [n for n, e in queries if not _may_be_empty(e) and not answers[n]["data"]["result"]]
    assert not empty, f"panels without data under load: {empty}"
    used = {m for _, e in queries for m in re.findall(r"\bllm_streams_[a-z0-9_]+", e)}
    assert used <= exposed, f"the dashboard reads series the worker does not expose: {used - exposed}"
    assert set(MAY_BE_EMPTY) <= used  # the list names only what the dashboard reads

    # the dashboard's worker picker, and the alerting rules loaded and evaluated without error
    values = await prometheus.get("/api/v1/label/instance/values",
                                  **{"match[]": "llm_streams_in_flight"})
    assert sorted(values["data"]) == sorted(f"127.0.0.1:{w.metrics_port}" for w in (worker, piped))
    rules = (await prometheus.get("/api/v1/rules"))["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(loaded) == set(_alerts(yaml.safe_load((PROM / "alerts.yml").read_text())))
    assert all(r["health"] == "ok" for r in loaded.values()), loaded


async def _exposed_series(worker: Worker) -> set[str]:
    """The series names the worker's /metrics declares (families without samples too)."""
    text = await worker.metrics_text()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    series = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        series |= {name + s for s in suffixes.get(kind, ("",))}
    return series
