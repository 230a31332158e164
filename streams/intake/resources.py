"""What one worker opens at start (``open_resources``): producer, HTTP session, Redis, dispatcher, cache.

Each is opened in order on the runtime's exit stack, so a stop (or a failed start) closes
them in reverse order. The processor is built on them (with the batch API's parking);
/metrics, /healthz and /readyz are served when ``metrics.port`` is set.

Usage::

    processor, redis = await open_resources(stack, settings, registry, metrics, front, ready)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack

import aiohttp
from prometheus_client import CollectorRegistry

from streams.batchapi.wiring import batch_parts
from streams.cache.responses import ResponseCache
from streams.config import Settings
from streams.dispatch.parts import build_dispatcher
from streams.dispatch.upstream import UpstreamClient
from streams.intake.front import Front
from streams.intake.owner import Ownership
from streams.intake.processor import Processor
from streams.kafka_io import start_producer
from streams.metrics import PipelineMetrics, start_http
from streams.output.publisher import KafkaPublisher
from streams.redis_io import RedisClient, open_redis


async def open_resources(
    stack: AsyncExitStack, s: Settings, registry: CollectorRegistry, metrics: PipelineMetrics,
    front: Front | None, ready: Callable[[], bool], owner: Ownership | None = None,
) -> tuple[Processor, RedisClient]:
    """Open the worker's resources on ``stack``; its processor and its Redis client."""
    publisher = await stack.enter_async_context(
        KafkaPublisher(lambda: start_producer(s), metrics)
    )
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    session = await stack.enter_async_context(
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
    )
    redis = open_redis(s)
    stack.push_async_callback(redis.aclose)
    dispatcher = await stack.enter_async_context(
        build_dispatcher(s, UpstreamClient(session), redis, registry)
    )
    # Always: with cache.enabled false it is the idempotency store alone (no lookups,
    # no coalescing), so a redelivery is still never sent upstream again.
    cache = await stack.enter_async_context(ResponseCache(s, redis, registry))
    parking = await stack.enter_async_context(batch_parts(  # work that can wait (batchapi)
        s, publisher, dispatcher, cache, metrics, registry, session))
    processor = Processor(s, publisher, dispatcher, cache, metrics, front=front, parking=parking,
                          owner=owner)
    if s.metrics.port:
        runner = await start_http(registry, s.metrics.host, s.metrics.port, ready)
        stack.push_async_callback(runner.cleanup)
    return processor, redis
