"""The fault suite's own Kafka broker and Redis, started with ``scripts/stack.sh``.

Scenarios stop and restart these servers, so they must never be the shared ones: the
ports default to 29092/29093 (Kafka, controller) and 26379 (Redis), the state to
``.stack-faults/``; ``FAULTS_KAFKA_PORT``, ``FAULTS_CONTROLLER_PORT``, ``FAULTS_REDIS_PORT``
and ``FAULTS_STACK_DIR`` move them.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "scripts" / "stack.sh"
SHARED_PORTS = {9092, 9093, 6379}  # the default stack other checkouts use: never stopped here


@dataclass(frozen=True)
class PrivateStack:
    state_dir: Path
    kafka_port: int
    controller_port: int
    redis_port: int

    @classmethod
    def from_env(cls) -> PrivateStack:
        env = os.environ
        stack = cls(
            Path(env.get("FAULTS_STACK_DIR", str(ROOT / ".stack-faults"))),
            int(env.get("FAULTS_KAFKA_PORT", "29092")),
            int(env.get("FAULTS_CONTROLLER_PORT", "29093")),
            int(env.get("FAULTS_REDIS_PORT", "26379")),
        )
        taken = SHARED_PORTS & {stack.kafka_port, stack.controller_port, stack.redis_port}
        if taken:
            raise RuntimeError(f"the fault suite stops its servers: port(s) {taken} are shared")
        return stack

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def redis_url(self, db: int = 0, user: str = "", password: str = "") -> str:
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        return f"redis://{auth}127.0.0.1:{self.redis_port}/{db}"

    def run(self, command: str, timeout: float = 300.0) -> str:
        """``scripts/stack.sh COMMAND`` against this stack; returns its stdout."""
        env = {
            **os.environ,
            "STACK_DIR": str(self.state_dir),
            "KAFKA_PORT": str(self.kafka_port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "REDIS_PORT": str(self.redis_port),
        }
        done = subprocess.run([str(STACK_SH), command], env=env, check=True, timeout=timeout,
                              stdout=subprocess.PIPE, text=True)
        return done.stdout

    def is_up(self) -> bool:
        status = self.run("status")
        return "kafka: up" in status and "redis: up" in status
