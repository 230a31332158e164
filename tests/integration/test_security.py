"""Secure connections on real servers of the tests' own: a Kafka broker whose only listener is
SASL_PLAINTEXT with SCRAM-SHA-256 (scripts/stack.sh in SASL mode), and redis-server with
requirepass and an ACL user. Right credentials: requests are answered end to end. Wrong
ones: the worker stops at start with one line naming user and server, never the secret.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.config import Settings, load_settings
from streams.errors import StartupError
from streams.redis_io import check_redis, open_redis
from tests.integration.harness import (
    PY,
    ROOT,
    Mock,
    Stack,
    Worker,
    answered,
    request,
    running,
    start_worker,
)
from tests.integration.servers import PrivateKafka, PrivateRedis, make_tls_files, sasl_kafka, serving

KAFKA_PASSWORD = "kafka-alice-Pw-7f3e9"
REDIS_PASSWORD = "redis-Pw-c41d2b"
WRONG = "not-the-password-91ab"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    with serving(sasl_kafka(tmp_path_factory.mktemp("sasl-kafka"), "alice", KAFKA_PASSWORD)) as kafka:
        yield kafka


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with serving(PrivateRedis(tmp_path / "redis", password=REDIS_PASSWORD)) as server:
        yield server


def _stack(base: Stack, **changes: Any) -> Stack:
    return Stack(base.tmp, base.endpoints, dict(base.overrides), **changes)


async def _answers_all(stack: Stack, env: dict[str, str] | None = None, n: int = 20) -> Worker:
    """A worker on ``stack`` (``env``: its credentials) answers n requests, then stops cleanly."""
    async with running(stack, env=env) as [worker]:
        outs = await answered(stack, (request(i) for i in range(n)), timeout=60)
        assert {o.value["id"] for o in outs} == {f"req-{i}" for i in range(n)}
        assert all(o.topic == stack.responses and o.value["status"] == "ok" for o in outs)
    return worker


def _single_line_failure(worker: Worker, expected: str, secrets: list[str]) -> None:
    code = worker.proc.wait(60)
    out = worker.log.read_text(errors="replace")
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 1, out
    assert lines == [f"llm-streams: {expected}"], out
    for secret in secrets:
        assert secret not in out


async def test_sasl_scram_right_password_answers_requests(
    broker: PrivateKafka, stack: Stack, mocks: list[Mock]
) -> None:
    sasl = _stack(stack, kafka=broker.bootstrap, sasl=broker.sasl)
    worker = await _answers_all(sasl, broker.sasl.worker_env())
    assert KAFKA_PASSWORD not in worker.log.read_text(errors="replace")


async def test_sasl_scram_wrong_password_fails_at_start_with_one_line(
    broker: PrivateKafka, stack: Stack, mocks: list[Mock]
) -> None:
    sasl = _stack(stack, kafka=broker.bootstrap, sasl=broker.sasl)
    worker = start_worker(sasl, env=broker.sasl.worker_env(WRONG))
    _single_line_failure(
        worker,
        f"kafka authentication failed for user alice (SCRAM-SHA-256) at {broker.bootstrap}",
        [WRONG, KAFKA_PASSWORD],
    )


def test_dlq_tools_use_sasl_and_stop_with_one_line_on_a_wrong_password(
    broker: PrivateKafka, stack: Stack
) -> None:
    sasl = _stack(stack, kafka=broker.bootstrap, sasl=broker.sasl)
    cfg = str(sasl.write_config())

    def inspect(password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "streams.tools.cli", "dlq", "inspect", "--config", cfg], cwd=ROOT, text=True,
            env={**os.environ, **broker.sasl.worker_env(password)}, capture_output=True,
            timeout=60,
        )

    ok = inspect(KAFKA_PASSWORD)
    assert ok.returncode == 0, ok.stderr
    assert sasl.dlq in ok.stdout
    bad = inspect(WRONG)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == (f"llm-streams: kafka authentication failed for user alice "
                          f"(SCRAM-SHA-256) at {broker.bootstrap}\n")


async def test_redis_requirepass_password_from_env_answers_requests(
    private_redis: PrivateRedis, stack: Stack, mocks: list[Mock]
) -> None:
    stack.overrides.update({"redis.url": private_redis.url(),
                            "redis.password_env": "IT_REDIS_PASSWORD"})
    worker = await _answers_all(stack, {"IT_REDIS_PASSWORD": REDIS_PASSWORD})
    assert REDIS_PASSWORD not in worker.log.read_text(errors="replace")


async def test_redis_wrong_password_in_url_fails_at_start_with_one_line(
    private_redis: PrivateRedis, stack: Stack, mocks: list[Mock]
) -> None:
    stack.overrides["redis.url"] = private_redis.url(password=WRONG)
    worker = start_worker(stack)
    _single_line_failure(
        worker,
        f"redis authentication failed for user default at 127.0.0.1:{private_redis.port}",
        [WRONG],
    )


async def _check(settings: Settings) -> bool:
    """The worker's Redis check at start, on a client of its own."""
    client = open_redis(settings)
    try:
        return await check_redis(client, settings)
    finally:
        await client.aclose()


async def test_redis_credentials_from_url_env_and_acl_user(private_redis: PrivateRedis) -> None:
    """Every documented way to give Redis credentials, checked on the real server."""
    admin = open_redis(load_settings(environ={}, redis={"url": private_redis.url(
        password=REDIS_PASSWORD)}))
    await admin.acl_setuser("app", enabled=True, passwords=["+app-Pw-55e1"], keys=["*"],
                            commands=["+@all"])
    await admin.aclose()
    good = [
        ({"url": private_redis.url(password=REDIS_PASSWORD)}, {}),
        ({"url": private_redis.url(user="default", password=REDIS_PASSWORD)}, {}),
        ({"url": private_redis.url(user="app", password="app-Pw-55e1")}, {}),
        ({"url": private_redis.url(), "password_env": "P"}, {"P": REDIS_PASSWORD}),
        ({"url": private_redis.url(), "username": "app", "password_env": "P"},
         {"P": "app-Pw-55e1"}),
    ]
    for redis_cfg, environ in good:
        assert await _check(load_settings(environ=environ, redis=redis_cfg)), redis_cfg
    for redis_cfg, environ, user in [
        ({"url": private_redis.url()}, {}, "default"),  # no password at all
        ({"url": private_redis.url(), "username": "app", "password_env": "P"},
         {"P": REDIS_PASSWORD}, "app"),
    ]:
        with pytest.raises(StartupError) as info:
            await _check(load_settings(environ=environ, redis=redis_cfg))
        assert str(info.value) == (
            f"redis authentication failed for user {user} at 127.0.0.1:{private_redis.port}")


async def test_redis_over_tls_with_a_private_ca(tmp_path: Path) -> None:
    """rediss:// with redis.ssl_cafile works; without the CA the worker stops with one line."""
    tls = make_tls_files(tmp_path / "tls")
    server = PrivateRedis(tmp_path / "redis-tls", password=REDIS_PASSWORD, tls=tls)
    server.start()
    try:
        url = server.url(password=REDIS_PASSWORD)
        settings = load_settings(environ={}, redis={"url": url, "ssl_cafile": str(tls.ca)})
        client = open_redis(settings)
        try:
            assert await check_redis(client, settings)
            await client.set("it-tls", b"over tls", ex=60)
            assert await client.get("it-tls") == b"over tls"
        finally:
            await client.aclose()
        with pytest.raises(StartupError) as info:
            await _check(load_settings(environ={}, redis={"url": url}))
        assert str(info.value).startswith(
            f"redis TLS certificate not trusted at 127.0.0.1:{server.port}: ")
        assert REDIS_PASSWORD not in str(info.value)
    finally:
        server.stop()
