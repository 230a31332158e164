from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.integration.harness import Mock, Stack
from tests.integration.redis_cluster import LocalCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def stack(tmp_path: Path, mocks: list[Mock]) -> Stack:
    return Stack(
        tmp_path,
        endpoints=[
            {"name": "mock-a", "url": f"{mocks[0].url}/v1", "weight": 3, "timeout_seconds": 5},
            {"name": "mock-b", "url": f"{mocks[1].url}/v1", "weight": 1, "timeout_seconds": 5},
        ],
    )


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local Redis Cluster (3 masters, 3 replicas), started once for the session's tests that
    ask for it; a test that kills a node restores the six before it ends."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def redis_clients(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[list[Any]]:
    """Three separate connections to the test database (flushed), as three worker processes
    would have."""
    cs = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
    try:
        yield cs
    finally:
        for c in cs:
            await c.aclose()


@pytest.fixture
async def unreachable_redis() -> AsyncIterator[aioredis.Redis]:
    """A client of a Redis that is not there: nothing listens on port 1, and with no
    client-side retries every command is refused at once."""
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2,
                          retry=Retry(NoBackoff(), 0))
    try:
        yield dead
    finally:
        await dead.aclose()
