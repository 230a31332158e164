"""The docker/ files cannot run here (no Docker engine): validate what can be validated."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from streams.cli import build_parser

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
    assert {"kafka", "redis", "worker-1", "worker-2", "prometheus"} <= set(services)
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
