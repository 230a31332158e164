"""`llm-streams dlq replay` brings exhausted requests back once the endpoints recover."""

from __future__ import annotations

import asyncio
import os

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.integration.harness import (
    KAFKA,
    PY,
    ROOT,
    Collector,
    Mock,
    Stack,
    encode,
    produce,
    request,
    start_worker,
)


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "streams.tools.cli", *args, cwd=ROOT, env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode()


async def _replay_headers(topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        md = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(topic, p) for p in md.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        found: list[bytes] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(v for m in msgs for k, v in (m.headers or ())
                             if k == "llm-streams.replay-of")
        return found
    finally:
        await consumer.stop()


async def test_replay_exhausted_dead_letters_after_recovery(
    stack: Stack, mocks: list[Mock]
) -> None:
    for m in mocks:
        await m.configure(down=True, status_on_error=503)
    stack.overrides["retry.max_attempts"] = 2
    stack.overrides["retry.cooldown_after_failures"] = 1000  # fail fast, no cooldown waits
    n = 20
    ids = {f"req-{i}" for i in range(n)}
    worker = start_worker(stack)
    try:
        await worker.ready()
        await produce(stack.requests, encode(request(i) for i in range(n)),
                      keys=[f"k{i}".encode() for i in range(n)])
        async with Collector(stack) as col:
            await col.wait_for(n, timeout=30)
            dead = [o for o in col.outputs if o.topic == stack.dlq]
            assert {o.value["id"] for o in dead} == ids
            assert all(o.value["error"]["type"] == "exhausted" for o in dead)

            for m in mocks:
                await m.configure(down=False)
            cfg = str(stack.write_config())
            code, out = await _cli("dlq", "replay", "--dry-run", "--config", cfg)
            assert code == 0 and f"selected {n}, would replay {n}, skipped 0" in out, out
            code, out = await _cli("dlq", "inspect", "--config", cfg)
            assert code == 0 and "exhausted" in out and str(n) in out, out
            code, out = await _cli("dlq", "replay", "--error-type", "exhausted",
                                   "--config", cfg)
            assert code == 0 and f"selected {n}, replayed {n}, skipped 0" in out, out

            deadline = asyncio.get_running_loop().time() + 30
            ok: set[str] = set()
            while ok != ids and asyncio.get_running_loop().time() < deadline:
                await col.poll()
                ok = {o.value["id"] for o in col.outputs
                      if o.topic == stack.responses and o.value["status"] == "ok"}
            assert ok == ids
            answered = [o for o in col.outputs if o.topic == stack.responses]
            assert all(o.key == f"k{o.value['id'][4:]}".encode() for o in answered)
        headers = await _replay_headers(stack.requests)
        assert len(headers) == n and all(h.startswith(f"{stack.dlq}/".encode()) for h in headers)
        assert worker.alive()
    finally:
        assert worker.stop() == 0
