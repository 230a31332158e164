"""Pipelines on the real broker and Redis with the project's mock: events in, enriched events out."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from typing import Any

import aiohttp
import jsonschema
import orjson
import yaml

from streams.config import load_settings
from tests.integration.harness import (
    PY,
    ROOT,
    Collector,
    Mock,
    Output,
    Stack,
    Worker,
    encode,
    produce,
    start_worker,
)

# The shipped support-triage pipeline's schema (category enum, urgency 1-5, summary).
SCHEMA = load_settings(ROOT / "config" / "pipelines" / "support-triage.yaml",
                       environ={}).pipelines[0].output.schema_
NAME = "triage"


def with_pipeline(stack: Stack, **over: Any) -> str:
    """Configure the stack with one pipeline (its sink and dead letters are the stack's
    responses and dead-letter topics, which the collector reads); returns its source topic."""
    source = f"it-{stack.name}.events"
    p: dict[str, Any] = {
        "name": NAME, "source": source, "sink": stack.responses, "dead_letter": stack.dlq,
        "model": "gpt-4o-mini", "id": "{{ event.id }}",
        "prompt": {"system": "Triage support tickets.",
                   "user": "Subject: {{ event.subject }}\n\n{{ event.body }}"},
        "output": {"format": "json", "schema": SCHEMA, "repair": 1, "field": "triage"},
        **over,
    }
    stack.overrides["pipelines"] = [p]
    return source


def start(stack: Stack) -> Worker:
    return start_worker(stack, args=("--pipeline", NAME))


def ticket(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"T-{i}", "subject": f"ticket {i}", "body": f"body of ticket {i}", **kw}


async def metric(worker: Worker, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{worker.metrics_port}/metrics") as r:
        text = await r.text()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(w in line for w in want))


async def until(col: Collector, n: int, timeout: float = 60.0) -> list[Output]:
    """The collected outputs once there are ``n`` (they may share an event's id)."""
    deadline = time.monotonic() + timeout
    while len(col.outputs) < n:
        assert time.monotonic() < deadline, f"{len(col.outputs)} of {n} outputs"
        await col.poll()
    return list(col.outputs)


def split(outs: list[Output], stack: Stack) -> tuple[list[Output], list[Output]]:
    return ([o for o in outs if o.topic == stack.responses],
            [o for o in outs if o.topic == stack.dlq])


async def test_ten_thousand_events_one_enriched_event_each(stack: Stack, mocks: list[Mock]) -> None:
    source = with_pipeline(stack)
    worker = start(stack)
    try:
        await worker.ready()
        n = 10_000
        await produce(source, encode(ticket(i) for i in range(n)),
                      keys=[f"k{i}".encode() for i in range(n)])
        async with Collector(stack) as col:
            outs = await col.wait_for(n, timeout=300)
        per_id = Counter(o.value["id"] for o in outs)
        assert set(per_id) == {f"T-{i}" for i in range(n)}
        assert len(outs) == n, f"{len(outs) - n} duplicate outputs"
        enriched, letters = split(outs, stack)
        assert not letters, letters[0].value
        valid = jsonschema.Draft202012Validator(SCHEMA)
        for o in enriched:
            assert valid.is_valid(o.value["triage"]), o.value
            i = int(o.value["id"][2:])
            assert o.key == f"k{i}".encode() and o.value["subject"] == f"ticket {i}"
            assert o.value["_llm"]["model"] == "gpt-4o-mini" and o.value["_llm"]["prompt_version"]
        assert await metric(worker, "llm_streams_pipeline_events_total", pipeline=NAME) == n
        assert worker.alive()
    finally:
        assert worker.stop() == 0


async def test_headers_are_kept(stack: Stack, mocks: list[Mock]) -> None:
    from aiokafka import AIOKafkaProducer

    source = with_pipeline(stack)
    worker = start(stack)
    try:
        await worker.ready()
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka)
        await producer.start()
        try:
            for i in range(20):
                await producer.send_and_wait(source, orjson.dumps(ticket(i)), key=b"k",
                                             headers=[("trace", f"t{i}".encode())])
        finally:
            await producer.stop()
        async with Collector(stack) as col:
            outs = await col.wait_for(20, timeout=60)
        assert sorted(o.headers["trace"] for o in outs) == sorted(f"t{i}".encode() for i in range(20))
        assert all(o.headers["trace"] == f"t{o.value['id'][2:]}".encode() for o in outs)
    finally:
        assert worker.stop() == 0


async def test_ten_percent_invalid_answers_with_one_repair(stack: Stack, mocks: list[Mock]) -> None:
    for m in mocks:
        await m.configure(invalid_share=0.1)
    source = with_pipeline(stack)
    worker = start(stack)
    try:
        await worker.ready()
        n = 3_000
        await produce(source, encode(ticket(i) for i in range(n)))
        async with Collector(stack) as col:
            outs = await col.wait_for(n, timeout=240)
        assert len(outs) == n
        enriched, letters = split(outs, stack)
        assert {o.value["error"]["type"] for o in letters} <= {"invalid_output"}
        # one re-ask leaves 10 % of 10 %: 1 % expected
        assert 0.003 * n <= len(letters) <= 0.03 * n, len(letters)
        valid = jsonschema.Draft202012Validator(SCHEMA)
        assert all(valid.is_valid(o.value["triage"]) for o in enriched)
        letter = letters[0].value
        assert letter["error"]["details"]["errors"] and letter["error"]["details"]["last_answer"]
        attempted = await metric(worker, "llm_streams_pipeline_repairs_total", result="attempted")
        succeeded = await metric(worker, "llm_streams_pipeline_repairs_total", result="succeeded")
        assert 0.05 * n <= attempted <= 0.15 * n, attempted
        assert succeeded == attempted - len(letters)
        assert sum(o.value["_llm"]["attempts"] == 2 for o in enriched) == succeeded
        assert await metric(worker, "llm_streams_pipeline_dead_letters_total",
                            type="invalid_output") == len(letters)
    finally:
        assert worker.stop() == 0


async def test_events_missing_a_field_are_template_dead_letters_and_the_partition_flows(
        stack: Stack, mocks: list[Mock]) -> None:
    source = with_pipeline(stack)
    worker = start(stack)
    try:
        await worker.ready()
        n = 300
        docs = [ticket(i) if i % 3 else {"id": f"T-{i}", "body": "no subject"} for i in range(n)]
        await produce(source, encode(docs), keys=[b"one-partition"] * n)
        async with Collector(stack) as col:
            outs = await col.wait_for(n, timeout=120)
        enriched, letters = split(outs, stack)
        assert len(outs) == n and len(letters) == n // 3 and len(enriched) == n - n // 3
        for o in letters:
            assert o.value["error"]["type"] == "template"
            assert o.value["error"]["message"] == "prompt.user: missing field 'subject'"
            assert int(o.value["id"][2:]) % 3 == 0 and o.key == b"one-partition"
        # the dlq commands read the pipeline's dead-letter topic; replay goes to its source
        cfg = stack.write_config()

        def dlq(*args: str) -> str:
            proc = subprocess.run([PY, "-m", "streams.tools.cli", "dlq", *args, "--config",
                                   str(cfg), "--pipeline", NAME], cwd=ROOT, capture_output=True,
                                  timeout=120, check=True)
            return proc.stdout.decode()

        assert "template" in dlq("inspect") and str(n // 3) in dlq("inspect")
        assert dlq("replay") == f"selected {n // 3}, replayed 0, skipped {n // 3} (template: {n // 3})\n"
        assert dlq("replay", "--error-type", "template").startswith(f"selected {n // 3}, replayed {n // 3}")
        async with Collector(stack) as col:
            again = await until(col, n + n // 3, timeout=120)
        replayed = [o for o in again if o.topic == stack.dlq and o.value["source"]["topic"] == source
                    and o.value["source"]["offset"] >= n]
        assert len(replayed) == n // 3
    finally:
        assert worker.stop() == 0


async def test_the_second_time_is_a_cache_hit_and_a_changed_template_is_not(
        stack: Stack, mocks: list[Mock]) -> None:
    source = with_pipeline(stack, id=None)  # topic-partition-offset ids: each event is new
    same = orjson.dumps(ticket(1))
    outs: list[Output] = []
    async with Collector(stack) as col:
        for user in ("Subject: {{ event.subject }}", "Ticket: {{ event.subject }}"):
            stack.overrides["pipelines"][0]["prompt"]["user"] = user
            worker = start(stack)
            try:
                await worker.ready()
                for _ in range(2):
                    await produce(source, [same], keys=[b"k"])
                    outs = await until(col, len(outs) + 1)
            finally:
                assert worker.stop() == 0
    llm = [o.value["_llm"] for o in sorted(outs, key=lambda o: o.value["_llm"]["id"])]
    assert [x["cached"] for x in llm] == [False, True, False, True]
    assert llm[0]["prompt_version"] == llm[1]["prompt_version"] != llm[2]["prompt_version"]
    assert llm[2]["prompt_version"] == llm[3]["prompt_version"]
    calls = [(await m.stats())["calls"] for m in mocks]
    assert sum(calls) == 2


def test_a_broken_schema_stops_the_worker_with_one_line(stack: Stack) -> None:
    with_pipeline(stack, output={"format": "json", "schema": {"type": "object",
                                                              "required": "category"}})
    cfg = stack.write_config()
    proc = subprocess.run([PY, "-m", "streams.tools.cli", "worker", "--config", str(cfg),
                           "--pipeline", NAME], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.count("\n") == 1, err
    assert err.startswith("llm-streams: pipeline triage: output.schema is not valid JSON Schema")
    assert yaml.safe_load(cfg.read_text())["pipelines"][0]["name"] == NAME
