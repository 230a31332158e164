"""The Helm chart (deploy/helm/llm-streams): `helm lint` and `helm template` over the default
values and the full-featured ci/full-values.yaml, and the rendered manifests' essentials.

helm is built from the Go module proxy by scripts/helm.sh the first time (minutes), then cached.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "llm-streams"
FULL = CHART / "ci" / "full-values.yaml"
SECRET_VALUE = "s3cr3t-value-never-rendered"

pytestmark = pytest.mark.timeout(1200)  # the first run builds helm


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "helm.sh")], capture_output=True, text=True,
                         check=False, timeout=1100)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False, timeout=120)


def render(helm: str, *args: str) -> dict[str, dict[str, Any]]:
    """``helm template`` with ``args``: the manifests by kind (one of each kind here)."""
    out = run(helm, "template", "llm", str(CHART), *args)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), [d["kind"] for d in docs]
    return by_kind


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    (worker,) = spec["containers"]
    return dict(worker)


def worker_config(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return dict(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"]))


@pytest.mark.parametrize("values", [[], ["-f", str(FULL)]], ids=["default", "full"])
def test_lint(helm: str, values: list[str]) -> None:
    out = run(helm, "lint", "--strict", str(CHART), *values)
    assert out.returncode == 0, out.stdout + out.stderr


def test_default_values_render_a_plain_deployment(helm: str) -> None:
    docs = render(helm)
    assert set(docs) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}
    assert docs["Deployment"]["spec"]["replicas"] == 2


@pytest.mark.parametrize("values", [[], ["-f", str(FULL)]], ids=["default", "full"])
def test_probes_grace_and_config(helm: str, values: list[str], tmp_path: Path) -> None:
    docs = render(helm, *values)
    worker = container(docs)
    port = worker["ports"][0]
    assert port["name"] == "metrics"
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["resources"]["requests"] and worker["resources"]["limits"]
    assert worker["args"][:3] == ["worker", "--config", "/etc/llm-streams/config.yaml"]

    cfg = worker_config(docs)
    assert cfg["metrics"] == {"host": "0.0.0.0", "port": port["containerPort"]}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > cfg["worker"]["shutdown_grace_seconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert docs["PodDisruptionBudget"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]

    # The rendered config is one the worker accepts, given the variables the pod sets.
    path = tmp_path / "config.yaml"
    path.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    environ = {e["name"]: "x" for e in worker["env"]}
    settings = load_settings(path, environ=environ)
    assert settings.metrics.host == "0.0.0.0"


def test_secrets_by_reference_and_never_rendered(helm: str) -> None:
    docs = render(helm, "-f", str(FULL))
    env = {e["name"]: e for e in container(docs)["env"]}
    cfg = worker_config(docs)
    named = {cfg["kafka"]["sasl_password_env"], cfg["redis"]["password_env"],
             *(e["api_key_env"] for e in cfg["endpoints"])}
    assert named == {"KAFKA_PASSWORD", "REDIS_PASSWORD", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"}
    for name in named:  # every variable the config names comes from a Secret, by name
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and "value" not in env[name]
    assert "Secret" not in docs  # the chart never makes one
    auth = docs["TriggerAuthentication"]["spec"]["secretTargetRef"]
    assert {a["parameter"]: a["name"] for a in auth} == {
        "username": "llm-streams-kafka-keda", "password": "llm-streams-kafka-keda"}
    # No key of the config holds a secret itself (the worker refuses one there anyway).
    flat = yaml.safe_dump(cfg)
    for key in ("api_key:", "sasl_password:", "password:"):
        assert key not in flat


def test_a_secret_value_in_values_is_not_rendered(helm: str) -> None:
    """A value put next to a Secret reference (a user's mistake) does not reach the output."""
    values = yaml.safe_load(FULL.read_text())
    values["secretEnv"][0]["value"] = SECRET_VALUE
    values["keda"]["password"] = SECRET_VALUE
    out = subprocess.run([helm, "template", "llm", str(CHART), "-f", str(FULL), "-f", "-"],
                         input=yaml.safe_dump(values), capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert SECRET_VALUE not in out.stdout


def test_keda_scales_on_the_groups_lag(helm: str) -> None:
    docs = render(helm, "-f", str(FULL))
    full = yaml.safe_load(FULL.read_text())
    assert "replicas" not in docs["Deployment"]["spec"]  # KEDA owns the count
    spec = docs["ScaledObject"]["spec"]
    assert spec["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == full["config"]["kafka"]["group_id"]
    assert meta["topic"] == full["config"]["topics"]["requests"]
    assert meta["lagThreshold"] == str(full["keda"]["lagThreshold"])
    assert meta["bootstrapServers"] == full["config"]["kafka"]["bootstrap_servers"]
    assert spec["maxReplicaCount"] <= full["keda"]["requestTopicPartitions"]
    assert trigger["authenticationRef"]["name"] == docs["TriggerAuthentication"]["metadata"]["name"]
    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["endpoints"][0]["port"] == "metrics"
    assert monitor["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()


@pytest.mark.parametrize(("sets", "message"), [
    (["keda.enabled=true", "keda.maxReplicaCount=5", "config.kafka.partitions=4"],
     "above the request topic's partitions"),
    (["keda.enabled=true", "keda.maxReplicaCount=8", "keda.requestTopicPartitions=6"],
     "above the request topic's partitions"),
    (["terminationGracePeriodSeconds=20"], "must be above config.worker.shutdown_grace_seconds"),
    (["config.worker.shutdown_grace_seconds=60", "terminationGracePeriodSeconds=45"],
     "must be above config.worker.shutdown_grace_seconds"),
    (["keda.enabled=true", "keda.maxReplicaCount=4", "keda.sasl=scram_sha256"],
     "keda.authSecretName is required"),
])
def test_bad_values_are_refused(helm: str, sets: list[str], message: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    out = run(helm, "template", "llm", str(CHART), *args)
    assert out.returncode != 0
    assert message in out.stderr


def test_grace_follows_the_workers_shutdown_grace(helm: str) -> None:
    docs = render(helm, "--set", "config.worker.shutdown_grace_seconds=50")
    assert docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
