"""Servers of a test's own, never the shared ones: a Kafka broker in SASL mode (through
scripts/stack.sh) and redis-server (with a password, TLS), each on free ports of 127.0.0.1,
stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "scripts" / "stack.sh"


class _Server(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


@contextmanager
def serving(server: S) -> Iterator[S]:
    """``server`` started, and stopped when the block ends (e.g. a fixture's ``yield``)."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Sasl:
    """SASL credentials for a private broker (written here, independent of the worker's code)."""

    user: str
    password: str
    mechanism: str = "SCRAM-SHA-256"
    password_env: str = "IT_KAFKA_PASSWORD"  # the worker reads the password from here

    def client_kwargs(self) -> dict[str, Any]:
        """aiokafka keyword arguments."""
        return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": self.mechanism,
                "sasl_plain_username": self.user, "sasl_plain_password": self.password}

    def config(self) -> dict[str, Any]:
        """The worker's ``kafka`` keys (no password: that is in the environment)."""
        return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": self.mechanism,
                "sasl_username": self.user, "sasl_password_env": self.password_env}

    def worker_env(self, password: str | None = None) -> dict[str, str]:
        """Environment for a worker: the password given, or the right one."""
        return {self.password_env: self.password if password is None else password}


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
    sasl: Sasl
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        shared_state = Path(os.environ.get("STACK_DIR", ROOT / ".stack"))
        return {**os.environ, "STACK_DIR": str(self.state), "KAFKA_PORT": str(self.port),
                "KAFKA_CONTROLLER_PORT": str(self.controller_port),
                "KAFKA_LIBS": str(shared_state / "kafka" / "libs"),  # fetched once per checkout
                "KAFKA_SASL_USER": self.sasl.user, "KAFKA_SASL_PASSWORD": self.sasl.password,
                "KAFKA_HEAP": "512m"}

    def start(self) -> None:
        subprocess.run([str(STACK_SH), "kafka-start"], env=self._env(), check=True, timeout=300,
                       stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        subprocess.run([str(STACK_SH), "kafka-stop"], env=self._env(), check=True, timeout=60,
                       stdout=subprocess.DEVNULL)


def sasl_kafka(state: Path, user: str, password: str) -> PrivateKafka:
    return PrivateKafka(state, Sasl(user, password))


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
    extra_args: list[str] = field(default_factory=list)  # more redis-server options

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
        args += self.extra_args
        if "--cluster-enabled" in self.extra_args and "--cluster-port" not in self.extra_args:
            # The cluster bus defaults to port + 10000, past 65535 for a free port above 55535
            # (Linux hands out up to 60999): redis-server then exits at start.
            args += ["--cluster-port", str(free_port())]
        with (self.dir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, 20, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None
