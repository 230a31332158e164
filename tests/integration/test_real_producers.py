"""Records as other producers write them: Kafka's own Java producer with every codec,
transactions aborted by their producer, tombstones, and a partition that cannot be decoded."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.harness import (
    KAFKA,
    ROOT,
    Collector,
    Mock,
    Stack,
    encode,
    produce,
    request,
    start_worker,
)

STACK_DIR = Path(os.environ.get("STACK_DIR", str(ROOT / ".stack")))
KAFKA_LIBS = Path(os.environ.get("KAFKA_LIBS", str(STACK_DIR / "kafka" / "libs")))
CODECS = ("gzip", "snappy", "lz4", "zstd")
NULL = "<null>"


def java_produce(topic: str, lines: list[tuple[str, str]], codec: str) -> None:
    """Kafka's own console producer (Java): one record per (key, value); ``NULL`` is a null value."""
    text = "".join(f"{k}\t{v}\n" for k, v in lines)
    subprocess.run(
        ["java", "-Xmx128m", "-cp", f"{KAFKA_LIBS}/*", "kafka.tools.ConsoleProducer",
         "--bootstrap-server", KAFKA, "--topic", topic, "--compression-codec", codec,
         "--producer-property", "linger.ms=100", "--producer-property", "acks=all",
         "--property", "parse.key=true", "--property", "key.separator=\t",
         "--property", f"null.marker={NULL}"],
        input=text.encode(), check=True, timeout=120, capture_output=True,
    )


def batch_codecs(topic: str) -> Counter[int]:
    """Compression codec ids (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd) of the record batches
    the broker stored for ``topic``, read from its log segments (record format v2)."""
    out: Counter[int] = Counter()
    dirs = list((STACK_DIR / "kafka" / "data").glob(f"{topic}-*"))
    assert dirs, f"no log directory for {topic} under {STACK_DIR} (set STACK_DIR)"
    for d in dirs:
        for seg in d.glob("*.log"):
            data = seg.read_bytes()
            pos = 0
            while pos + 23 <= len(data):
                length = struct.unpack_from(">i", data, pos + 8)[0]
                attributes = struct.unpack_from(">h", data, pos + 21)[0]
                if length <= 0:
                    break
                out[attributes & 0x07] += 1
                pos += 12 + length
    return out


async def test_every_codec_from_a_java_producer_is_answered_and_outputs_compressed(
    stack: Stack, mocks: list[Mock]
) -> None:
    stack.overrides["kafka.compression_type"] = "zstd"
    worker = start_worker(stack)
    try:
        await worker.ready()
        per_codec = 40
        for c, codec in enumerate(CODECS):
            docs = [request(c * per_codec + i) for i in range(per_codec)]
            lines = [(f"k{c}-{i}", orjson.dumps(d).decode()) for i, d in enumerate(docs)]
            # a tombstone in every codec: one dead letter each, the worker goes on
            lines.insert(per_codec // 2, (f"tomb-{codec}", NULL))
            java_produce(stack.requests, lines, codec)
        n = per_codec * len(CODECS)
        async with Collector(stack) as col:
            outs = await col.wait_for(n + len(CODECS), timeout=120)
        answered = {o.value["id"] for o in outs if o.topic == stack.responses}
        assert answered == {f"req-{i}" for i in range(n)}
        letters = [o for o in outs if o.topic == stack.dlq]
        assert sorted(o.key for o in letters) == sorted(f"tomb-{c}".encode() for c in CODECS)
        assert all(o.value["error"]["type"] == "validation" for o in letters)
        assert worker.alive()
    finally:
        assert worker.stop() == 0
    stored = batch_codecs(stack.responses)
    assert stored and set(stored) == {4}, f"response batches by codec id: {dict(stored)}"
    assert set(batch_codecs(stack.dlq)) == {4}


async def test_an_aborted_transaction_is_never_answered(stack: Stack, mocks: list[Mock]) -> None:
    worker = start_worker(stack)
    try:
        await worker.ready()
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA, transactional_id=f"it-{uuid.uuid4().hex}")
        await producer.start()
        try:
            await producer.begin_transaction()
            for i in range(50):
                await producer.send(stack.requests, orjson.dumps(request(1000 + i)), key=b"aborted")
            await producer.abort_transaction()
            async with producer.transaction():
                for i in range(50):
                    await producer.send(stack.requests, orjson.dumps(request(i)), key=b"committed")
        finally:
            await producer.stop()
        await produce(stack.requests, encode(request(i) for i in range(50, 60)))  # not transactional
        async with Collector(stack) as col:
            outs = await col.wait_for(60, timeout=120)
            await asyncio.sleep(2)  # an aborted record answered late would show up here
            await col.poll()
        assert col.ids() == {f"req-{i}" for i in range(60)}
        calls = sum([(await m.stats())["calls"] for m in mocks])
        assert calls == 60, f"{calls} upstream calls for 60 committed records"
        assert all(o.key != b"aborted" for o in outs)
    finally:
        assert worker.stop() == 0


BLOCK_CRAMJAM = "import sys\nsys.modules['cramjam'] = None  # as if the codecs were not installed\n"


@pytest.mark.timeout(180)
async def test_a_partition_that_cannot_be_decoded_is_held_and_the_others_flow(
    stack: Stack, mocks: list[Mock], tmp_path: Path
) -> None:
    # A worker without the snappy/lz4/zstd libraries meets zstd records on partition 0 only.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCK_CRAMJAM)
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    worker = start_worker(stack, env=env)
    try:
        await worker.ready()
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA, compression_type="zstd", linger_ms=20)
        plain = AIOKafkaProducer(bootstrap_servers=KAFKA, compression_type="gzip", linger_ms=20)
        await producer.start()
        await plain.start()
        try:
            good = [await plain.send(stack.requests, orjson.dumps(request(i)), partition=p)
                    for p in (0, 1, 2, 3) for i in range(p * 100, p * 100 + 25)]
            await asyncio.gather(*good)
            await asyncio.gather(*[
                await producer.send(stack.requests, orjson.dumps(request(900 + i)), partition=0)
                for i in range(10)
            ])
            later = [await plain.send(stack.requests, orjson.dumps(request(i)), partition=p)
                     for p in (1, 2, 3) for i in range(p * 100 + 25, p * 100 + 50)]
            await asyncio.gather(*later)
        finally:
            await producer.stop()
            await plain.stop()
        wanted = {f"req-{i}" for p in (0, 1, 2, 3) for i in range(p * 100, p * 100 + 25)}
        wanted |= {f"req-{i}" for p in (1, 2, 3) for i in range(p * 100 + 25, p * 100 + 50)}
        async with Collector(stack) as col:
            await col.wait_for(len(wanted), timeout=90)
        assert col.ids() == wanted  # nothing of the held partition past its bad batch
        assert worker.alive()
        url = f"http://127.0.0.1:{worker.metrics_port}/readyz"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert resp.status == 503
        held = [line for line in worker.log.read_text().splitlines()
                if "cannot be read at offset 25" in line]
        assert len(held) == 1 and f"{stack.requests}[0]" in held[0], held
    finally:
        assert worker.stop() == 0
