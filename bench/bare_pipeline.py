"""Peer (a): the bare pipeline, no faust, no cache, no limits: the floor of the miss path.

aiokafka ``getmany`` -> one aiohttp POST per record, at most ``--concurrency`` in flight at
once (fetching pauses at the cap, like the worker's ``limits.max_inflight``) -> aiokafka
``send`` of a small response record as soon as its call returns -> a ``commit`` every
``--commit-interval`` seconds of each partition's lowest unfinished offset, with the worker's
garbage-collector threshold (``worker.gc_threshold``'s default). No batch barrier:
a slow call holds back only the commit, never the next fetch. Run as its own process so its
CPU is measured like a worker's::

    python -m bench.bare_pipeline --requests T --responses T2 --group G --url http://.../v1 \
        --concurrency 512

It prints ``READY`` once it owns every partition, then runs until SIGTERM. With
``--probe FILE`` it carries the same light instrumentation as a probed worker (bench.probe).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import signal
import time
from collections import deque

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from bench.kafka_load import PARTITIONS
from bench.procs import KAFKA


class Offsets:
    """Per partition, the offsets fetched in order and which of them are finished."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, deque[list[int]]] = {}  # [offset, done]
        self._next: dict[TopicPartition, int] = {}

    def add(self, tp: TopicPartition, offset: int) -> list[int]:
        entry = [offset, 0]
        self._open.setdefault(tp, deque()).append(entry)
        self._next[tp] = offset + 1
        return entry

    def committable(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Each partition's lowest unfinished offset (everything below it is answered)."""
        out = {}
        for tp, q in self._open.items():
            while q and q[0][1]:
                q.popleft()
            out[tp] = OffsetAndMetadata(q[0][0] if q else self._next[tp], "")
        return out


async def run(args: argparse.Namespace) -> None:  # noqa: C901 (one loop, a few small closures)
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
    offsets = Offsets()
    tasks: set[asyncio.Task[None]] = set()
    room = asyncio.Event()  # set when a call finishes: fetching resumes below the cap
    inflight = [0]
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(value: bytes, ts: int, key: bytes | None, entry: list[int]) -> None:
            try:
                req = orjson.loads(value)
                body = orjson.dumps({"model": "gpt-4o-mini",
                                     "messages": [{"role": "user", "content": req["input"]}]})
                async with session.post(next(urls), data=body,
                                        headers={"content-type": "application/json"}) as r:
                    doc = orjson.loads(await r.read())
                out = {"id": req["id"], "status": "ok", "output": doc["choices"][0]["message"]["content"],
                       "latency_ms": int(time.time() * 1000) - ts}
                if "mock" in doc:  # the slow scenario subtracts the mock's own delay
                    out["response"] = {"mock": doc["mock"]}
                await producer.send(args.responses, value=orjson.dumps(out), key=key)
            finally:
                entry[1] = 1
                inflight[0] -= 1
                room.set()

        async def committer() -> None:
            while True:
                await asyncio.sleep(args.commit_interval)
                await producer.flush()
                await consumer.commit(offsets.committable())

        commit_task = asyncio.create_task(committer())
        print("READY", flush=True)
        try:
            while not stop.is_set():
                while inflight[0] >= args.concurrency:
                    room.clear()
                    await room.wait()
                free = args.concurrency - inflight[0]  # fetch no more than there is room for
                batches = await consumer.getmany(timeout_ms=200, max_records=free)
                for tp, msgs in batches.items():
                    for m in msgs:
                        inflight[0] += 1
                        t = asyncio.create_task(one(m.value, m.timestamp, m.key, offsets.add(tp, m.offset)))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
        finally:
            commit_task.cancel()
            for t in list(tasks):
                t.cancel()
            await consumer.stop()
            await producer.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", required=True)
    p.add_argument("--responses", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--url", action="append", required=True, help="base URL ending in /v1 (repeatable)")
    p.add_argument("--concurrency", type=int, default=512)
    p.add_argument("--commit-interval", type=float, default=1.0)
    p.add_argument("--probe", help="write bench.probe's figures to this file")
    p.add_argument("--gc-threshold", type=int, default=100_000,
                   help="gc.set_threshold(N, 50, 100), as the worker's worker.gc_threshold (0: Python's)")
    args = p.parse_args()
    if args.gc_threshold:  # the same tuning as the worker: a floor, not a strawman
        gc.set_threshold(args.gc_threshold, 50, 100)
    if args.probe:
        from bench import probe

        probe.install(args.probe)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
