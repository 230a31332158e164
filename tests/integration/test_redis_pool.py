"""The worker's Redis client under a burst of concurrent commands, on the real Redis."""

from __future__ import annotations

import asyncio
import uuid

from streams.config import load_settings
from streams.redis_io import open_redis


async def test_a_burst_waits_for_the_bounded_pool_instead_of_failing(redis_url: str) -> None:
    settings = load_settings(redis={"url": redis_url, "max_connections": 8}, environ={})
    client = open_redis(settings)
    prefix = f"pool-{uuid.uuid4().hex[:8]}"
    try:
        async def one(i: int) -> list[object]:
            pipe = client.pipeline(transaction=False)
            pipe.set(f"{prefix}:{i}", i, ex=30)
            pipe.get(f"{prefix}:{i}")
            return list(await pipe.execute())

        # far more than redis-py's default pool of 100: none may fail with "Too many connections"
        results = await asyncio.gather(*(one(i) for i in range(3000)))
        assert [r[1] for r in results] == [str(i).encode() for i in range(3000)]
        pool = client.connection_pool
        assert len(pool._in_use_connections) + len(pool._available_connections) <= 8
    finally:
        await client.aclose()
        await client.connection_pool.aclose()


def test_pool_size_default() -> None:
    assert load_settings(environ={}).redis.max_connections == 128
