"""The worker image from docker/Dockerfile, built with podman and run against the local stack.

scripts/image.sh builds it (on a stand-in for python:3.11-slim made from Debian's packages,
cached after the first run). The worker runs in it as the image's non-root user with a read-only
root filesystem, config mounted and overridden by environment variables, against real Kafka and
Redis and mock endpoints on the host; /healthz, /readyz and /metrics are checked from outside,
SIGTERM must end it with exit 0 within its grace period, and `llm-streams batch` runs from it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import (
    ROOT,
    Collector,
    Mock,
    Stack,
    encode,
    produce,
    request,
    wait_http,
)
from tests.integration.servers import free_port

TAG = os.environ.get("IMAGE_TAG", "llm-streams:test")
SCRIPT = ROOT / "scripts" / "image.sh"
GRACE = 5  # the worker's shutdown_grace_seconds in the test's config
SECRET = "sk-image-test-never-logged"
SECRET_ENV = {**os.environ, "MOCK_API_KEY": SECRET}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "podman", *args], capture_output=True, text=True,
                          check=False, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built unless `make image-test` just did (IMAGE_BUILT=1)."""
    if not os.environ.get("IMAGE_BUILT"):
        out = subprocess.run([str(SCRIPT), "build"], capture_output=True, text=True, check=False,
                             timeout=1700)
        assert out.returncode == 0, out.stderr
    return TAG


@pytest.fixture
def stack(tmp_path: Path, mocks: list[Mock]) -> Stack:
    tmp_path.chmod(0o755)  # the container's user reads the config from here
    return Stack(tmp_path, endpoints=[
        {"name": f"mock-{i}", "url": f"{m.url}/v1", "timeout_seconds": 5,
         "api_key_env": "MOCK_API_KEY"} for i, m in enumerate(mocks)
    ])


class Container:
    """``llm-streams worker`` in the image, as `podman run` in the foreground."""

    def __init__(self, image: str, stack: Stack) -> None:
        self.name = f"llm-streams-it-{stack.name}"
        self.port = free_port()
        cfg = stack.write_config()
        cfg.chmod(0o644)
        self.log = stack.tmp / "container.log"
        self.proc = subprocess.Popen(
            [str(SCRIPT), "run", "--name", self.name,  # --network host and the ulimits
             "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/home/llm",
             "-v", f"{cfg}:/etc/llm-streams/test.yaml:ro",
             # environment over the file, as on Kubernetes: the listener and the key
             "-e", "LLM_STREAMS__METRICS__HOST=0.0.0.0",
             "-e", f"LLM_STREAMS__METRICS__PORT={self.port}",
             "-e", "MOCK_API_KEY",  # its value from our environment, not the command line
             image, "worker", "--config", "/etc/llm-streams/test.yaml"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=SECRET_ENV,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def remove(self) -> None:
        if self.proc.poll() is None:
            podman("kill", self.name)
            self.proc.wait(30)
        podman("rm", "--force", "--ignore", self.name)


@pytest.fixture
def container(image: str, stack: Stack) -> Iterator[Container]:
    c = Container(image, stack)
    try:
        yield c
    finally:
        c.remove()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def run_batch(image: str, stack: Stack, n: int) -> tuple[subprocess.CompletedProcess[str], Path]:
    data = stack.tmp / "batch"
    data.mkdir()
    data.chmod(0o777)  # the container's user writes the answers here
    (data / "requests.jsonl").write_bytes(
        b"".join(orjson.dumps(request(i, input=f"batch prompt {i}")) + b"\n" for i in range(n)))
    cfg = stack.write_config()
    cfg.chmod(0o644)
    out = subprocess.run(
        [str(SCRIPT), "run", "--rm", "--read-only", "--tmpfs", "/tmp",
         "-v", f"{data}:/data", "-v", f"{cfg}:/etc/llm-streams/test.yaml:ro", "-e", "MOCK_API_KEY",
         image, "batch", "/data/requests.jsonl", "--save", "/data/answers.jsonl",
         "--config", "/etc/llm-streams/test.yaml", "--timeout", "120"],
        capture_output=True, text=True, check=False, timeout=200, env=SECRET_ENV)
    return out, data / "answers.jsonl"


async def test_worker_in_the_image(image: str, stack: Stack, container: Container) -> None:
    await wait_http(container.url("/readyz"), timeout=180)
    assert container.proc.poll() is None

    # The image's user, not root.
    user = podman("exec", container.name, "id", "-u")
    assert user.returncode == 0 and user.stdout.strip() == "10001", user

    n = 60
    await produce(stack.requests, encode(request(i) for i in range(n)))
    async with Collector(stack) as col:
        outs = await col.wait_for(n, timeout=120)
    assert {o.value["id"] for o in outs} == {f"req-{i}" for i in range(n)}
    assert all(o.topic == stack.responses and o.value["status"] == "ok" for o in outs)
    assert all(o.value["output"].startswith("mock answer") for o in outs)

    assert (await get(container.url("/healthz")))[0] == 200
    assert (await get(container.url("/readyz")))[0] == 200
    status, text = await get(container.url("/metrics"))
    assert status == 200
    assert metric(text, "llm_streams_outputs_total", outcome="ok") == n
    assert metric(text, "llm_streams_assigned_partitions") == 4

    out, answers = await asyncio.to_thread(run_batch, image, stack, 20)
    assert out.returncode == 0, out.stdout + out.stderr
    got = [orjson.loads(line) for line in answers.read_bytes().splitlines()]
    assert sorted(a["id"] for a in got) == sorted(f"req-{i}" for i in range(20))
    assert all(a["status"] == "ok" and a["output"].startswith("mock answer") for a in got)

    # SIGTERM: the worker drains and exits 0 within its grace period.
    start = time.monotonic()
    kill = podman("kill", "--signal", "TERM", container.name)
    assert kill.returncode == 0, kill.stderr
    code = await asyncio.to_thread(container.proc.wait, GRACE + 15)
    took = time.monotonic() - start
    log = container.log.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert took < GRACE + 10, f"stopped after {took:.1f} s"
    assert SECRET not in log and SECRET not in out.stdout + out.stderr
