"""Shared fixtures. Integration tests need `make stack-up` (real Kafka and Redis on 127.0.0.1)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from tests.integration.harness import Mock, StartMock, start_mocks

# Speed is measured by benchmarks, not tests: no per-example deadline (a busy machine made the
# 200 ms default fail property tests whose code was right).
settings.register_profile("streams", deadline=None)
settings.load_profile("streams")

REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "15"))
KAFKA_BOOTSTRAP = os.environ.get("TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


@pytest.fixture
def redis_url() -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
async def mocks() -> AsyncIterator[list[Mock]]:
    """Two mock endpoints (``llm-streams mock-llm``), stopped after the test."""
    ms = await start_mocks(2)
    try:
        yield ms
    finally:
        for m in ms:
            m.stop()


@pytest.fixture
async def mock_llm() -> AsyncIterator[StartMock]:
    """Starts one mock endpoint per call, with the given ``llm-streams mock-llm`` arguments
    (e.g. ``await mock_llm("--latency-ms", "20")``); every one stopped after the test."""
    started: list[Mock] = []

    async def start(*args: str) -> Mock:
        [mock] = await start_mocks(1, *args)
        started.append(mock)
        return mock

    try:
        yield start
    finally:
        for m in started:
            m.stop()
