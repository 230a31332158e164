"""The servers fail under a running group: Kafka and Redis restarts, a response topic that
refuses every write for a while."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.intake.stopping import STOP_MARGIN_SECONDS
from tests.faults.stack import PrivateStack
from tests.faults.trial import APPEND_TIME, Fleet, Trial, configure, keep_polling, metric, pick, stop_all
from tests.integration.harness import Mock, Stack, encode, produce, request


async def _outage(trial: Trial, private_stack: PrivateStack, server: str, seconds: float) -> float:
    """Stop a server, keep reading outputs for ``seconds``, start it again; the downtime."""
    down = time.monotonic()
    await asyncio.to_thread(private_stack.run, f"{server}-stop")
    await keep_polling(trial, seconds)
    await asyncio.to_thread(private_stack.run, f"{server}-start")
    return time.monotonic() - down


async def _server_restart(server: str, stack: Stack, mocks: list[Mock], fleet: Fleet,
                          private_stack: PrivateStack) -> None:
    n = pick(4000, 20_000)
    await configure(mocks, latency_ms=50, jitter_ms=30)
    # a group-wide rate spreads the run over the outage (Redis down: each worker limits
    # itself to its share, limits.local_fallback_fraction)
    stack.overrides["limits.max_requests_per_second"] = pick(120, 250)
    stack.overrides["limits.local_fallback_fraction"] = 0.5
    name = {"kafka": "2 Kafka restart", "redis": "3 Redis restart"}[server]
    async with Trial(name, stack, mocks) as trial:
        workers = [fleet.start(), fleet.start()]
        await asyncio.gather(*(w.ready() for w in workers))
        await trial.send([trial.request(i) for i in range(n)])
        await trial.wait_answered(n // 4, timeout=120)
        before = trial.answered
        # longer than the session timeout (10 s): the group must re-form after the broker returns
        downtime = await _outage(trial, private_stack, server, pick(15.0, 30.0))
        assert trial.answered < n, "the run ended before the server came back"
        await trial.wait_all(timeout=pick(240, 600))
        assert all(w.alive() for w in workers), "a worker died: it must ride out the outage"
        await stop_all(workers)
        await trial.verdict(f"{server} down {downtime:.0f} s after {before:,} outputs; "
                            "2 workers, none restarted")


@pytest.mark.timeout(pick(300, 900))
async def test_kafka_broker_stopped_and_restarted(
    stack: Stack, mocks: list[Mock], fleet: Fleet, private_stack: PrivateStack
) -> None:
    await _server_restart("kafka", stack, mocks, fleet, private_stack)


@pytest.mark.timeout(pick(300, 900))
async def test_redis_stopped_and_restarted(
    stack: Stack, mocks: list[Mock], fleet: Fleet, private_stack: PrivateStack
) -> None:
    await _server_restart("redis", stack, mocks, fleet, private_stack)


async def _topic_config(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    """Replace a topic's dynamic configs (every key not given goes back to its default)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (resp,) = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
        errors = [r for r in resp.resources if r[0] != 0]
        assert not errors, errors
    finally:
        await admin.close()


@pytest.mark.timeout(pick(300, 900))
async def test_response_topic_refuses_writes_for_a_while(
    stack: Stack, mocks: list[Mock], fleet: Fleet
) -> None:
    n = pick(4000, 20_000)
    refused_for = pick(10.0, 30.0)
    await configure(mocks, latency_ms=50, jitter_ms=30)
    stack.overrides["limits.max_requests_per_second"] = pick(150, 300)
    async with Trial("8 output failure", stack, mocks) as trial:
        workers = [fleet.start(), fleet.start()]
        await asyncio.gather(*(w.ready() for w in workers))
        # keyless requests give keyless responses, which a compacted topic refuses
        await trial.send([trial.request(i, keyed=False) for i in range(n)])
        await trial.wait_answered(n // 4, timeout=120)
        await _topic_config(stack.kafka, stack.responses, {**APPEND_TIME, "cleanup.policy": "compact"})
        refused = time.time()
        await keep_polling(trial, refused_for)
        await _topic_config(stack.kafka, stack.responses, APPEND_TIME)
        accepted = time.time()
        assert trial.answered < n, "the run ended before the topic took writes again"
        await trial.wait_all(timeout=pick(240, 600))
        inside = [o for o in trial.outputs_of(stack.responses)
                  if refused + 1.0 < o.timestamp / 1000 < accepted]
        assert not inside, f"{len(inside)} responses appended while the topic refused writes"
        errors = [await metric(w, "llm_streams_publish_errors_total") for w in workers]
        assert sum(errors) > 0, "no worker saw a failed publish"
        assert all(w.alive() for w in workers), "a worker died instead of retrying"
        await stop_all(workers)
        await trial.verdict(f"response topic refused every write for {accepted - refused:.0f} s "
                            f"({sum(errors):,.0f} failed publishes); 2 workers, none restarted")


@pytest.mark.timeout(pick(180, 300))
async def test_sigterm_with_the_broker_gone_exits_0_within_the_grace_period(
    stack: Stack, mocks: list[Mock], fleet: Fleet, private_stack: PrivateStack
) -> None:
    # The group coordinator goes away (the only broker stops) while requests are in flight;
    # the stop must not wait on it: exit 0 within the grace period plus the stop margin.
    grace = 4.0
    await configure(mocks, latency_ms=30_000, jitter_ms=0)  # held past the grace period
    stack.overrides["worker.shutdown_grace_seconds"] = grace
    worker = fleet.start()
    await worker.ready()
    await produce(stack.requests, encode(request(i) for i in range(200)), bootstrap=stack.kafka)
    deadline = time.monotonic() + 60
    while await metric(worker, "llm_streams_in_flight") < 100:
        assert time.monotonic() < deadline, "the worker never held the requests"
        await asyncio.sleep(0.2)
    await asyncio.to_thread(private_stack.run, "kafka-stop")
    try:
        started = time.monotonic()
        code = await asyncio.to_thread(worker.stop, 120)
        took = time.monotonic() - started
    finally:
        await asyncio.to_thread(private_stack.run, "kafka-start")
    limit = grace + STOP_MARGIN_SECONDS + 3  # a few seconds for the process to start its stop
    assert code == 0, f"exit code {code} after {took:.1f} s"
    assert took < limit, f"the stop took {took:.1f} s (limit {limit:.0f} s)"
