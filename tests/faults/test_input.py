"""What the records and the configuration hold: hostile input, and secrets that must never
show up anywhere."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.faults.hostile import MAX_VALUE_BYTES, bad_records, examples, good_request, prompt_of, with_id
from tests.faults.stack import PrivateStack
from tests.faults.trial import Fleet, Record, Trial, pick, stop_all
from tests.integration.harness import PY, ROOT, Mock, Stack, Worker


@pytest.mark.timeout(pick(300, 900))
async def test_hostile_records_mixed_with_valid_ones(stack: Stack, mocks: list[Mock], fleet: Fleet) -> None:
    n = pick(300, 3000)
    bad = examples(bad_records(), n)
    good = [with_id(doc, f"hostile-{i}") for i, doc in enumerate(examples(good_request(), n))]
    assert len(bad) == len(good) == n
    stack.overrides["limits.max_value_bytes"] = MAX_VALUE_BYTES
    records = []
    for i, (value, doc) in enumerate(zip(bad, good, strict=True)):
        records.append(Record(value, key=None if i % 2 else b"\xff\x00 bad key"))
        records.append(Record(orjson.dumps(doc), f"k{i}".encode(), doc["id"], prompt_of(doc)))
    async with Trial("6 hostile input", stack, mocks) as trial:
        worker = fleet.start()
        await worker.ready()
        await trial.send(records)
        await trial.wait_all(timeout=pick(180, 600))
        for sent in trial.sent.values():
            first = sent.outputs[0]
            if sent.record.id is None:
                assert first.topic == stack.dlq, f"malformed record answered: {sent.record.value[:200]!r}"
                assert first.value["error"]["type"] == "validation", first.value["error"]
            else:
                assert first.topic == stack.responses, f"valid request dead-lettered: {first.value}"
                assert first.value["status"] == "ok"
        assert worker.alive(), "the worker died"
        assert "Traceback" not in worker.log.read_text(errors="replace")
        await stop_all([worker])
        await trial.verdict(f"{n:,} malformed (Hypothesis: bad JSON, deep nesting, huge, wrong types, "
                            f"invalid UTF-8, control characters, values no output can carry: "
                            f"integers beyond int64, NaN/Infinity, cache.ttl and deadline out of "
                            f"range) + {n:,} valid with legal extremes; 1 worker, never restarted")


@pytest.fixture
async def redis_user(private_stack: PrivateStack) -> AsyncIterator[tuple[str, str]]:
    """A Redis user with a password (the default user stays open for the other scenarios)."""
    user, password = f"faults-{uuid.uuid4().hex[:8]}", f"redis-pw-{uuid.uuid4().hex}"
    admin = aioredis.Redis.from_url(private_stack.redis_url())
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    try:
        yield user, password
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()


async def _logged(worker: Worker, marks: tuple[str, ...], timeout: float = 90.0) -> None:
    """Until the worker's log holds one of ``marks``."""
    for _ in range(int(timeout * 4)):
        if any(m in worker.log.read_text(errors="replace") for m in marks):
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"none of {marks} in {worker.log} after {timeout:.0f} s")


async def _scrape(worker: Worker) -> str:
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.text()


def _cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([PY, "-m", "streams.tools.cli", *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.mark.timeout(pick(300, 600))
async def test_secrets_never_appear_in_logs_records_metrics_or_errors(
    stack: Stack, mocks: list[Mock], fleet: Fleet, private_stack: PrivateStack,
    redis_user: tuple[str, str],
) -> None:
    n = pick(600, 4000)
    user, redis_password = redis_user
    secrets = {
        "FAULTS_KEY_A": f"sk-a-{uuid.uuid4().hex}",
        "FAULTS_KEY_B": f"sk-b-{uuid.uuid4().hex}",
        "FAULTS_SASL_PASSWORD": f"sasl-{uuid.uuid4().hex}",
        "FAULTS_REDIS_PASSWORD": redis_password,
        "FAULTS_WRONG_REDIS_PASSWORD": f"wrong-{uuid.uuid4().hex}",
    }
    env = dict(secrets)
    stack.endpoints[0]["api_key_env"] = "FAULTS_KEY_A"
    stack.endpoints[1]["api_key_env"] = "FAULTS_KEY_B"
    stack.endpoints.append({"name": "mock-gone", "url": "http://127.0.0.1:9/v1", "weight": 0.3,
                            "api_key_env": "FAULTS_KEY_A", "timeout_seconds": 2})  # refused
    stack.overrides.update({"kafka.sasl_mechanism": "PLAIN", "kafka.sasl_username": "llm-streams",
                            "kafka.sasl_password_env": "FAULTS_SASL_PASSWORD",
                            "worker.log_level": "DEBUG", "retry.max_attempts": 3})
    await mocks[0].configure(latency_ms=50, error_rate=0.05, status_on_error=401)  # dead letters
    await mocks[1].configure(latency_ms=50, faults={"500": 0.2, "429": 0.1, "reset": 0.05},
                             retry_after=0.2)
    url_with_password = private_stack.redis_url(user=user, password=redis_password)
    wrong = private_stack.redis_url(user=user, password=secrets["FAULTS_WRONG_REDIS_PASSWORD"])
    async with Trial("7 secrets", stack, mocks) as trial:
        in_url = fleet.start(env, redis__url=url_with_password)
        from_env = fleet.start(env, redis__url=private_stack.redis_url(user=user),
                               redis__password_env="FAULTS_REDIS_PASSWORD")
        refused = fleet.start(env, redis__url=wrong)  # stops at start: Redis refuses its login
        await asyncio.gather(in_url.ready(), from_env.ready())  # both logged in to Redis
        await _logged(refused, ("redis authentication failed",))
        assert refused.proc.wait(30) == 1  # one line and exit 1: no restart can fix a password
        await trial.send([trial.request(i) for i in range(n)])
        await trial.wait_all(timeout=pick(240, 600))
        refused.kill()
        metrics = [await _scrape(w) for w in (in_url, from_env)]
        await stop_all([in_url, from_env])
        row = await trial.verdict()
        config = stack.write_config(redis__url=url_with_password)
        cli = [_cli("dlq", "inspect", "--config", str(config), env=env),
               _cli("worker", "--config", str(config),
                    env={**env, "LLM_STREAMS__LIMITS__MAX_INFLIGHT": "0"})]
    assert cli[0].startswith("exit 0") and "dead letters in" in cli[0], cli[0]
    assert cli[1].startswith("exit 2") and "limits.max_inflight" in cli[1], cli[1]
    logs = [w.log.read_text(errors="replace") for w in (in_url, from_env, refused)]
    for m in mocks:
        stats = await m.stats()
        assert stats["calls"] > 0 and stats["authorized"] == stats["calls"], stats
    records = [orjson.dumps([o.value, {k: v.decode(errors="replace") for k, v in o.headers.items()}])
               .decode() for s in trial.sent.values() for o in s.outputs]
    dead = sum(1 for s in trial.sent.values() for o in s.outputs if o.topic == stack.dlq)
    places = {"log": logs, "record": records, "metrics": metrics, "cli": cli}
    hits = [(name, where) for name, secret in secrets.items()
            for where, texts in places.items() for text in texts if secret in text]
    assert not hits, f"secrets found: {hits}"
    lines = sum(t.count("\n") for t in logs)
    metric_lines = sum(t.count("\n") for t in metrics)
    row.notes = (f"{len(secrets)} secrets (2 API keys, Redis password in a URL and from env, a wrong "
                 f"one, SASL password) in none of {lines:,} log lines (DEBUG), {len(records):,} "
                 f"records ({dead:,} dead letters), {metric_lines:,} metric lines, 2 CLI outputs")
