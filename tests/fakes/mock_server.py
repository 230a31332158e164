"""The mock endpoint served in the test's own process (aiohttp's test server on a free port)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp.test_utils import TestServer

from mockllm.server import MockBehaviour, MockLLM


@asynccontextmanager
async def serving_mock(behaviour: MockBehaviour) -> AsyncIterator[tuple[MockLLM, str]]:
    """A mock with ``behaviour``, served until the block ends: the mock and its /v1 base URL."""
    llm = MockLLM(behaviour)
    server = TestServer(llm.app())
    await server.start_server()
    try:
        yield llm, f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.close()
