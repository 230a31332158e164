"""A local Redis Cluster for tests: 3 masters and 3 replicas on 127.0.0.1, torn down after.

Ports ``TEST_REDIS_CLUSTER_PORT`` (default 17301) and the next five; each node's cluster bus is
its port + 10000. ``cluster-node-timeout`` is 1 s, so a killed master's replica takes over
within a few seconds.

Usage::

    cluster = LocalCluster(tmp_path)
    cluster.start()            # six redis-servers, then redis-cli --cluster create
    cluster.url                # redis://127.0.0.1:17301/0, for redis.url with redis.cluster
    port = cluster.master_of(slot); cluster.kill(port); cluster.wait_promoted(slot, port)
    cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.integration.servers import wait_port

BASE_PORT = int(os.environ.get("TEST_REDIS_CLUSTER_PORT", "17301"))
NODE_TIMEOUT_MS = 1000


@dataclass
class LocalCluster:
    dir: Path
    base_port: int = BASE_PORT
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ports(self) -> list[int]:
        return [self.base_port + i for i in range(6)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.base_port}/0"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        assert binary and cli, "redis-server and redis-cli are needed: scripts/stack.sh setup"
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        self.wait_ready()

    def start_node(self, port: int) -> None:
        binary = shutil.which("redis-server")
        assert binary
        folder = self.dir / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--save", "", "--appendonly", "no", "--dir", str(folder)]
        with (folder / "server.log").open("ab") as log:
            self.procs[port] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_port(port, 20, self.procs[port])

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every live node says cluster_state:ok and sees 3 masters, each replica in sync."""
        deadline = time.monotonic() + timeout
        while True:
            if self._ready():
                return
            assert time.monotonic() < deadline, "the cluster did not become ready"
            time.sleep(0.2)

    def _ready(self) -> bool:
        for port in self.live():
            with self.node(port) as r:
                if r.cluster("info")["cluster_state"] != "ok":
                    return False
                info = r.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
        return len(self.masters()) == 3

    def live(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def masters(self) -> list[int]:
        """Ports of the masters holding slots, as a live node sees them."""
        with self.node(self.live()[0]) as r:
            slots = r.execute_command("CLUSTER", "SLOTS")
        return sorted({int(s[2][1]) for s in slots})

    def master_of(self, slot: int) -> int:
        with self.node(self.live()[0]) as r:
            for start, end, master, *_ in r.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise AssertionError(f"slot {slot} is not covered")

    def replica_of(self, master: int) -> int:
        with self.node(master) as r:
            slaves = r.info("replication")
        return int(slaves["slave0"]["port"])

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_promoted(self, slot: int, old_master: int, timeout: float = 30.0) -> int:
        """The port of the master that took ``slot`` over from ``old_master``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master_of(slot)
            except (AssertionError, redis.RedisError):
                port = old_master
            if port != old_master:
                with self.node(port) as r:
                    if r.cluster("info")["cluster_state"] == "ok":
                        return port
            time.sleep(0.1)
        raise AssertionError(f"no replica took slot {slot} over within {timeout} s")

    def command_calls(self, port: int) -> dict[str, int]:
        """``INFO commandstats`` of one node: calls per command (lower case)."""
        with self.node(port) as r:
            stats = r.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    def reset_stats(self) -> None:
        for port in self.live():
            with self.node(port) as r:
                r.config_resetstat()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
