"""Processes and clients for integration tests: mock endpoints, workers, a producer, a collector.

Every test gets its own topics and consumer group, so tests never see each other's records.
The producer and collector are plain aiokafka clients, independent of the worker's code.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "scripts" / "stack.sh"
KAFKA = os.environ.get("TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "15"))
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, timeout: float = 30.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s")


@dataclass
class Mock:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stats(self, log: bool = False) -> dict[str, Any]:
        url = f"{self.url}/stats" + ("?log=1" if log else "")
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return dict(await r.json())

    async def configure(self, **changes: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(f"{self.url}/config", json=changes) as r:
            assert r.status == 200, await r.text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_mock(*args: str) -> Mock:
    port = free_port()
    proc = subprocess.Popen(
        [PY, "-m", "streams.cli", "mock-llm", "--port", str(port), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return Mock(port, proc)


async def start_mocks(n: int, *args: str) -> list[Mock]:
    mocks = [start_mock(*args) for _ in range(n)]
    for m in mocks:
        await wait_http(f"{m.url}/stats")
    return mocks


@dataclass(frozen=True)
class KafkaAccess:
    """How tests reach a broker: the shared PLAINTEXT one, or a private one with SASL."""

    bootstrap: str = KAFKA
    user: str | None = None
    password: str | None = None
    mechanism: str = "SCRAM-SHA-256"
    password_env: str = "IT_KAFKA_PASSWORD"  # the worker reads the password from here

    def client_kwargs(self) -> dict[str, Any]:
        """aiokafka keyword arguments (written here, independent of the worker's code)."""
        if self.user is None:
            return {"bootstrap_servers": self.bootstrap}
        return {"bootstrap_servers": self.bootstrap, "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": self.mechanism, "sasl_plain_username": self.user,
                "sasl_plain_password": self.password}

    def config(self) -> dict[str, Any]:
        """The worker's ``kafka`` keys for this broker (no password: that is in the env)."""
        if self.user is None:
            return {"bootstrap_servers": self.bootstrap}
        return {"bootstrap_servers": self.bootstrap, "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": self.mechanism, "sasl_username": self.user,
                "sasl_password_env": self.password_env}

    def worker_env(self, password: str | None = None) -> dict[str, str]:
        """Environment for a worker: the password given, or the right one."""
        if self.user is None:
            return {}
        return {self.password_env: password if password is not None else self.password or ""}


PLAIN = KafkaAccess()


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} after {timeout} s")


@dataclass
class PrivateKafka:
    """A broker of one test module's own: scripts/stack.sh in SASL mode, on free ports.

    Never the shared broker: its state lives under ``state`` and stop() stops only its pid.
    """

    state: Path
    access: KafkaAccess
    controller_port: int = field(default_factory=free_port)

    def _env(self) -> dict[str, str]:
        port = self.access.bootstrap.rpartition(":")[2]
        shared_state = Path(os.environ.get("STACK_DIR", ROOT / ".stack"))
        return {**os.environ, "STACK_DIR": str(self.state), "KAFKA_PORT": port,
                "KAFKA_CONTROLLER_PORT": str(self.controller_port),
                "KAFKA_LIBS": str(shared_state / "kafka" / "libs"),  # fetched once per checkout
                "KAFKA_SASL_USER": self.access.user or "",
                "KAFKA_SASL_PASSWORD": self.access.password or "", "KAFKA_HEAP": "512m"}

    def start(self) -> None:
        subprocess.run([str(STACK_SH), "kafka-start"], env=self._env(), check=True, timeout=300,
                       stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        subprocess.run([str(STACK_SH), "kafka-stop"], env=self._env(), check=True, timeout=60,
                       stdout=subprocess.DEVNULL)


def sasl_kafka(state: Path, user: str, password: str) -> PrivateKafka:
    return PrivateKafka(state, KafkaAccess(f"127.0.0.1:{free_port()}", user, password))


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=it-ca",
         "-keyout", str(folder / "ca.key"), "-out", str(files.ca)],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", str(files.key), "-out", str(folder / "server.csr")],
        ["x509", "-req", "-days", "1", "-in", str(folder / "server.csr"), "-CA", str(files.ca),
         "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-extfile", str(ext),
         "-out", str(files.cert)],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    return files


@dataclass
class PrivateRedis:
    """A redis-server of one test's own on a free port of 127.0.0.1 (never the shared one);
    with ``tls``, that port speaks only TLS."""

    dir: Path
    password: str | None = None
    tls: TlsFiles | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, user: str = "", password: str | None = None) -> str:
        auth = f"{user}:{password}@" if password is not None else (f"{user}@" if user else "")
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: run scripts/stack.sh setup"
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir)]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                     "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                     "--tls-ca-cert-file", str(self.tls.ca)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        with (self.dir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, 20, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None


@dataclass
class Stack:
    """One test's topics, group and config file."""

    tmp: Path
    endpoints: list[dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    kafka: KafkaAccess = PLAIN

    @property
    def requests(self) -> str:
        return f"it-{self.name}.requests"

    @property
    def responses(self) -> str:
        return f"it-{self.name}.responses"

    @property
    def dlq(self) -> str:
        return f"it-{self.name}.dlq"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "kafka": {**self.kafka.config(), "group_id": f"it-{self.name}", "partitions": 4,
                      "commit_interval_seconds": 0.5, "session_timeout_seconds": 10},
            "topics": {"requests": self.requests, "responses": self.responses,
                       "dead_letter": self.dlq},
            "redis": {"url": f"redis://127.0.0.1:6379/{REDIS_DB}", "key_prefix": f"it-{self.name}"},
            "retry": {"base_delay_ms": 20, "max_delay_ms": 200},
            "endpoints": self.endpoints,
            "metrics": {"port": 0},
            "worker": {"shutdown_grace_seconds": 5},
        }
        for dotted, value in self.overrides.items():
            node = cfg
            *path, last = dotted.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
        return cfg

    def write_config(self, **extra: Any) -> Path:
        cfg = self.config()
        for dotted, value in extra.items():
            section, key = dotted.split("__")
            cfg.setdefault(section, {})[key] = value
        path = self.tmp / f"config-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path

    async def ready(self, timeout: float = 60.0) -> None:
        await wait_http(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_worker(stack: Stack, env: dict[str, str] | None = None, **extra: Any) -> Worker:
    port = free_port()
    cfg = stack.write_config(metrics__port=port, **extra)
    log = stack.tmp / f"worker-{port}.log"
    proc = subprocess.Popen(
        [PY, "-m", "streams.cli", "worker", "--config", str(cfg)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    return Worker(proc, port, log)


def request(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"req-{i}", "input": f"prompt number {i}", **kw}


async def produce(topic: str, values: Iterable[bytes], keys: Iterable[bytes | None] | None = None,
                  access: KafkaAccess = PLAIN) -> int:
    producer = AIOKafkaProducer(**access.client_kwargs(), linger_ms=5, acks="all")
    await producer.start()
    n = 0
    try:
        futs = []
        key_iter = iter(keys) if keys is not None else None
        for v in values:
            k = next(key_iter) if key_iter is not None else None
            futs.append(await producer.send(topic, value=v, key=k))
            n += 1
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return n


def encode(docs: Iterable[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(d) for d in docs]


@dataclass
class Output:
    topic: str
    key: bytes | None
    value: dict[str, Any]
    headers: dict[str, bytes]


class Collector:
    """Reads the responses and dead-letter topics from the beginning."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.outputs: list[Output] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Collector:
        self._consumer = AIOKafkaConsumer(**self.stack.kafka.client_kwargs(),
                                          enable_auto_commit=False, auto_offset_reset="earliest")
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def _assign(self) -> None:
        c = self._consumer
        assert c is not None
        if c.assignment():
            return
        md = await c._client.fetch_all_metadata()
        tps = [TopicPartition(t, p) for t in (self.stack.responses, self.stack.dlq)
               for p in sorted(md.partitions_for_topic(t) or ())]
        if tps:
            c.assign(tps)
            await c.seek_to_beginning(*tps)

    async def poll(self) -> None:
        await self._assign()
        c = self._consumer
        assert c is not None
        if not c.assignment():
            await asyncio.sleep(0.3)
            return
        batches = await c.getmany(timeout_ms=300, max_records=10_000)
        for tp, msgs in batches.items():
            for m in msgs:
                self.outputs.append(
                    Output(tp.topic, m.key, orjson.loads(m.value), dict(m.headers or ())))

    def ids(self) -> set[str | None]:
        return {o.value.get("id") for o in self.outputs}

    async def wait_for(self, n: int, timeout: float = 120.0) -> list[Output]:
        """Wait until outputs for n distinct ids (or n outputs without id) have arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.poll()
            if self.distinct() >= n:
                # read a little longer to catch duplicates already in flight
                for _ in range(3):
                    await self.poll()
                return self.outputs
        raise TimeoutError(f"{self.distinct()} of {n} outputs after {timeout} s")

    def distinct(self) -> int:
        seen: set[Any] = set()
        for o in self.outputs:
            rid = o.value.get("id")
            seen.add(rid if rid is not None else ("offset", o.value["source"]["offset"],
                                                   o.value["source"]["partition"]))
        return len(seen)
