"""Peer (a): the bare pipeline, no faust, no cache, no limits.

aiokafka ``getmany`` -> one aiohttp POST per record (at most ``--concurrency`` at once) ->
aiokafka ``send`` of a small response record -> ``commit`` after the batch is acknowledged.
Run as its own process so its CPU is measured like a worker's::

    python -m bench.bare_pipeline --requests T --responses T2 --group G --url http://.../v1 \
        --concurrency 512

It prints ``READY`` once it owns every partition, then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.kafka_load import PARTITIONS
from bench.procs import KAFKA


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=args.group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True, linger_ms=2)
    await consumer.start()
    await producer.start()
    consumer.assign([TopicPartition(args.requests, p) for p in range(PARTITIONS)])
    urls = itertools.cycle([u + "/chat/completions" for u in args.url])
    sem = asyncio.Semaphore(args.concurrency)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(value: bytes, ts: int) -> bytes:
            req = orjson.loads(value)
            body = orjson.dumps({"model": "gpt-4o-mini",
                                 "messages": [{"role": "user", "content": req["input"]}]})
            async with sem, session.post(next(urls), data=body,
                                         headers={"content-type": "application/json"}) as r:
                doc = orjson.loads(await r.read())
            return orjson.dumps({"id": req["id"], "status": "ok",
                                 "output": doc["choices"][0]["message"]["content"],
                                 "latency_ms": int(time.time() * 1000) - ts})

        print("READY", flush=True)
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=args.concurrency)
                msgs = [m for ms in batches.values() for m in ms]
                if not msgs:
                    continue
                outs = await asyncio.gather(*(one(m.value, m.timestamp) for m in msgs))
                futs = [await producer.send(args.responses, value=v, key=m.key)
                        for m, v in zip(msgs, outs, strict=True)]
                await asyncio.gather(*futs)
                await consumer.commit()
        finally:
            await consumer.stop()
            await producer.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", required=True)
    p.add_argument("--responses", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--url", action="append", required=True, help="base URL ending in /v1 (repeatable)")
    p.add_argument("--concurrency", type=int, default=512)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
