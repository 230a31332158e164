"""CPU per record of the miss path in one process: the real processor, dispatcher, admission
and response cache on a real Redis; no Kafka (outputs are kept, not produced) and a fake
upstream. It isolates what the worker's own code costs per record from faust, the broker
and the HTTP client.

    python -m bench.inproc --redis-url redis://127.0.0.1:6379/15 [--cache] [--batch 512]
                           [--stream] [--n 10000] [--runs 2]

``--batch N``: records handed to the processor together. ``--stream``: a new batch every
0.5 ms while earlier ones are in flight, and an upstream answering in 0-4 ms (misses are then
granted and answered a few at a time, as on a worker; the Redis batches are small).
The database given is flushed first.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from typing import Any

import orjson
import uvloop
from prometheus_client import CollectorRegistry

from streams.cache.responses import ResponseCache
from streams.config import load_settings
from streams.contract import Source
from streams.dispatch.parts import build_dispatcher
from streams.errors import OutputTooLarge
from streams.intake.processor import InRecord, Processor
from streams.metrics import PipelineMetrics
from streams.output.records import Headers, OutRecord
from streams.redis_io import open_redis

BODY = {"id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fresh"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class Upstream:
    """Answers every chat call with ``BODY`` after ``delay()`` seconds."""

    def __init__(self, jitter: bool) -> None:
        self._jitter = jitter

    async def complete(self, endpoint: Any, model: str, messages: Any, params: Any
                       ) -> dict[str, Any]:
        await asyncio.sleep(random.random() * 0.004 if self._jitter else 0.001)
        return dict(BODY)


class Outputs:
    """A publisher that only counts (no Kafka)."""

    def __init__(self) -> None:
        self.count = 0

    async def publish(self, topic: str, key: bytes | None, value: bytes,
                      headers: Headers | None = None) -> None:
        self.count += 1

    async def publish_many(self, records: list[OutRecord]) -> list[OutputTooLarge | None]:
        self.count += len(records)
        return [None] * len(records)


def records(n: int, base: int) -> list[InRecord]:
    now = int(time.time() * 1000)
    return [InRecord(Source("requests", 0, base + i, now), None,
                     orjson.dumps({"id": f"r{base + i}", "input": f"prompt {base + i}"}))
            for i in range(n)]


async def run(args: argparse.Namespace) -> float:
    s = load_settings(environ={}, redis={"url": args.redis_url},
                      endpoints=[{"name": "a", "url": "http://127.0.0.1:1/v1"}],
                      limits={"max_inflight": 512}, cache={"enabled": args.cache})
    redis = open_redis(s)
    await redis.flushdb()
    reg = CollectorRegistry()
    dispatcher = build_dispatcher(s, Upstream(args.stream), None, reg)
    cache = ResponseCache(s, redis, reg)
    outputs = Outputs()
    proc = Processor(s, outputs, dispatcher, cache, PipelineMetrics(CollectorRegistry()))
    base = int(time.time()) * 10**6

    def done(rec: InRecord, outcome: str) -> None:
        pass

    async with dispatcher:
        await proc.process_batch(records(200, base + 10**7), done)  # warm-up
        gc.collect()
        gc.disable()
        c0 = time.process_time()
        if args.stream:
            batches = []
            for b in range(0, args.n, args.batch):
                batches.append(asyncio.ensure_future(
                    proc.process_batch(records(min(args.batch, args.n - b), base + b), done)))
                await asyncio.sleep(0.0005)
            await asyncio.gather(*batches)
        else:
            for b in range(0, args.n, args.batch):
                await proc.process_batch(records(min(args.batch, args.n - b), base + b), done)
        used: float = time.process_time() - c0
        gc.enable()
    await cache.aclose()
    await redis.aclose()
    return used / int(args.n) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--cache", action="store_true", help="cache.enabled (default: off)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    uvloop.install()
    got = [asyncio.run(run(args)) for _ in range(args.runs)]
    print(f"miss path in one process, cache {'on' if args.cache else 'off'}, batch {args.batch}"
          f"{', streamed' if args.stream else ''}: CPU us/record "
          + ", ".join(f"{g:.1f}" for g in got) + " (records built in the loop included)")


if __name__ == "__main__":
    main()
