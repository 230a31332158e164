"""Processes the benchmark starts: nginx, the project's mock, workers, helper processes.

Every process is started in its own session (process group) and registered with a
``Procs`` owner; ``Procs.close()`` (always called from a ``finally``) kills each group.
CPU and RSS are read from /proc so every peer is measured the same way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# The test stack's ports when set (a private stack), else the default local stack.
KAFKA = os.environ.get("BENCH_KAFKA_BOOTSTRAP", os.environ.get("TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", os.environ.get("TEST_REDIS_PORT", "6379")))
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/{REDIS_DB}"
NGINX = os.environ.get("BENCH_NGINX", shutil.which("nginx") or "/usr/sbin/nginx")
# The Quix Streams peer's interpreter: its own venv (quixstreams pins an older pydantic than
# the worker's), this one when there is none (the peer then reports itself skipped).
_QUIX_VENV = ROOT / ".venv-quix" / "bin" / "python"
QUIX_PY = os.environ.get("BENCH_QUIX_PYTHON", str(_QUIX_VENV) if _QUIX_VENV.exists() else PY)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The fixed OpenAI-style answer nginx returns for every POST /v1/chat/completions.
CANNED = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "benchmark answer"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
}


@dataclass(frozen=True)
class Code:
    """Which checkout's worker runs: this one, or another revision's (``python -m bench.run
    --compare``), imported from ``root`` first (cwd and PYTHONPATH) with this venv."""

    root: Path = ROOT
    label: str = "this checkout"

    @property
    def cli(self) -> str:
        """The CLI module: streams/tools/cli.py since the #15 layout, streams/cli.py before."""
        return "streams.tools.cli" if (self.root / "streams/tools/cli.py").exists() else "streams.cli"

    def env(self) -> dict[str, str] | None:
        if self.root == ROOT:
            return None
        return {"PYTHONPATH": str(self.root)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


class Procs:
    """Owner of every process and temp dir one benchmark run starts."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="llm-streams-bench-"))
        self._procs: list[subprocess.Popen[bytes]] = []
        self.code: Code = Code()  # whose worker runs (bench.run --compare swaps it per run)

    def spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None,
              stdout_pipe: bool = False, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        with (self.tmp / log_name).open("wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                args, stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log if stdout_pipe else subprocess.STDOUT,
                cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True,
                preexec_fn=_raise_nofile,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited."""
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in list(reversed(self._procs)):
            self.stop(proc, timeout=5.0)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the stand-ins -------------------------------------------------------------------

    async def nginx(self, ports: list[int]) -> subprocess.Popen[bytes]:
        """nginx answering POST /v1/chat/completions with CANNED on each port."""
        root = self.tmp / f"nginx-{ports[0]}"
        root.mkdir()
        body = orjson.dumps(CANNED).decode()
        assert "'" not in body
        servers = "\n".join(f"""
    server {{
        listen 127.0.0.1:{p} backlog=4096 reuseport;
        location = /v1/chat/completions {{ default_type application/json; return 200 '{body}'; }}
        location = /health {{ return 200 'ok'; }}
    }}""" for p in ports)
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 40000;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
{servers}
}}
"""
        path = root / "nginx.conf"
        path.write_text(conf)
        proc = self.spawn([NGINX, "-p", str(root), "-c", str(path)], f"nginx-{ports[0]}.log")
        for p in ports:
            await wait_http(f"http://127.0.0.1:{p}/health", 15, proc)
        return proc

    async def mock(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        proc = self.spawn([PY, "-m", "streams.tools.cli", "mock-llm", "--port", str(port), *args],
                          f"mock-{port}.log")
        await wait_http(f"http://127.0.0.1:{port}/stats", 30, proc)
        return proc

    def worker(self, cfg: dict[str, Any], name: str,
               probe: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """A worker of ``self.code``; with ``probe``, under bench.probe writing to that file."""
        port = free_port()
        cfg = {**cfg, "metrics": {"port": port, "host": "127.0.0.1"}}
        path = self.tmp / f"{name}-{port}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        head = [PY, "-m", self.code.cli]
        if probe is not None:
            head = [PY, "-m", "bench.probe", "--out", str(probe), "--cli", self.code.cli]
        proc = self.spawn([*head, "worker", "--config", str(path)], f"{name}-{port}.log",
                          cwd=self.code.root, env=self.code.env())
        return proc, port

    async def worker_ready(self, proc: subprocess.Popen[bytes], port: int, timeout: float = 90) -> None:
        await wait_http(f"http://127.0.0.1:{port}/readyz", timeout, proc)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class RssSampler:
    """Samples the peak RSS of some processes every ``interval`` seconds in the background."""

    def __init__(self, pids: list[int], interval: float = 0.2) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self._sample()

    def _sample(self) -> None:
        total = 0.0
        for pid in self.pids:
            try:
                total += rss_mb(pid)
            except OSError:
                pass
        self.peak = max(self.peak, total)

    async def _loop(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval)
