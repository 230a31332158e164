"""The cache-hit path's floor: a bare relay, no faust, no validation, no dispatcher.

aiokafka ``getmany`` -> one Redis ``MGET`` of the batch's keys (sha256 of the prompt) -> one
aiokafka ``send`` per record carrying the cached body -> await the batch's deliveries ->
``commit``. The harness seeds the keys (bench.scenarios.bare_relay). Run as its own process::

    python -m bench.bare_relay --requests T --responses T2 --group G --prefix P

It prints ``READY`` once it owns every partition, then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import time

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.kafka_load import PARTITIONS
from bench.procs import KAFKA, REDIS_URL


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=args.group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True, linger_ms=2,
                                max_batch_size=256 * 1024)
    redis = aioredis.Redis.from_url(REDIS_URL)
    await consumer.start()
    await producer.start()
    consumer.assign([TopicPartition(args.requests, p) for p in range(PARTITIONS)])
    prefix = f"{args.prefix}:hit:"
    print("READY", flush=True)
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=args.max_records)
            msgs = [m for ms in batches.values() for m in ms]
            if not msgs:
                continue
            reqs = [orjson.loads(m.value) for m in msgs]
            keys = [prefix + hashlib.sha256(r["input"].encode()).hexdigest() for r in reqs]
            bodies = await redis.mget(keys)
            now = int(time.time() * 1000)
            futs = []
            for m, req, body in zip(msgs, reqs, bodies, strict=True):
                out = ({"id": req["id"], "status": "ok", "cached": True, "response": orjson.Fragment(body),
                        "latency_ms": now - m.timestamp} if body is not None else
                       {"id": req["id"], "status": "miss", "cached": False})
                futs.append(await producer.send(args.responses, value=orjson.dumps(out), key=m.key))
            await asyncio.gather(*futs)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
        await redis.aclose()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", required=True)
    p.add_argument("--responses", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--prefix", required=True, help="the Redis key prefix the harness seeded")
    p.add_argument("--max-records", type=int, default=2000, help="records per getmany (one MGET each)")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
