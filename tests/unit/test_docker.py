"""The docker/ files cannot run here (no Docker engine): validate what can be validated."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from streams.batchapi.metrics import BatchMetrics
from streams.cache.responses import ResponseCache
from streams.config import Settings
from streams.dispatch.parts import build_dispatcher
from streams.metrics import PipelineMetrics
from streams.pipelines.metrics import PipelineStageMetrics
from streams.tools.cli import build_parser
from tests.fakes.fake_redis import FakeRedis

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def test_dockerfile_copies_existing_paths_and_runs_non_root() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), src
    assert re.search(r"^USER (?!root)\S+", text, flags=re.M)
    assert 'ENTRYPOINT ["llm-streams"]' in text


def test_compose_parses_and_commands_exist_in_the_cli() -> None:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert {"kafka", "redis", "worker-1", "worker-2", "prometheus", "grafana"} <= set(services)
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).exists()
            cmd = svc.get("command", ["worker"])
            assert cmd[0] in commands, f"{name}: {cmd[0]}"
            build_parser().parse_args(cmd)  # the arguments parse too
        for vol in svc.get("volumes", []):
            assert (DOCKER / vol.split(":")[0]).exists(), vol


def test_prometheus_config_scrapes_every_worker() -> None:
    doc = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = doc["scrape_configs"][0]["static_configs"][0]["targets"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    workers = [n for n in compose["services"] if n.startswith("worker")]
    assert sorted(t.split(":")[0] for t in targets) == sorted(workers)


GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llm-streams.json"


def _exported_series() -> dict[str, set[str]]:
    """Every metric family a worker exports -> the series names Prometheus stores for it."""
    registry = CollectorRegistry()
    settings = Settings(endpoints=[{"name": "a", "url": "http://a.test/v1"}])
    PipelineMetrics(registry)
    build_dispatcher(settings, None, None, registry)  # type: ignore[arg-type]
    ResponseCache(settings, FakeRedis(), registry)  # type: ignore[arg-type]
    PipelineStageMetrics(registry)
    BatchMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count"), "gauge": ("",)}
    return {m.name: {m.name + s for s in suffixes[m.type]} for m in registry.collect()}


def _panel_exprs(doc: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in doc["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in sub.get("targets", [])]
    return exprs


def test_grafana_dashboard_covers_every_exported_metric() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["panels"]
    exprs = _panel_exprs(doc)
    used = {n for e in exprs for n in re.findall(r"\bllm_streams_[a-z0-9_]+", e)}
    exported = _exported_series()
    assert len(exported) >= 25
    missing = sorted(f for f, series in exported.items() if not series & used)
    assert not missing, f"metric families in no panel: {missing}"
    known = set().union(*exported.values())
    assert not used - known, f"panels query series no worker exports: {sorted(used - known)}"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("throughput", "outcomes", "latency", "hit ratio", "endpoint state",
                  "in flight", "retries", "dead letters", "tokens", "lag"):
        assert topic in titles, topic
    for e in exprs:  # balanced brackets: a cheap syntax check without Prometheus
        assert e.count("(") == e.count(")") and e.count("{") == e.count("}"), e


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    grafana = compose["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert "prometheus" in grafana["depends_on"]
    mounts = {v.split(":")[1]: DOCKER / v.split(":")[0] for v in grafana["volumes"]}
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = ds["datasources"]
    port = compose["prometheus"]["ports"][0].split(":")[-1]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{port}"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    assert mounts[path] == GRAFANA / "dashboards" and (mounts[path] / DASHBOARD.name).exists()
    for target in mounts:
        if target.startswith("/etc/grafana/provisioning/"):
            assert mounts[target].is_file()
