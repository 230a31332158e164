from __future__ import annotations

from collections.abc import AsyncIterator
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from streams.config import EndpointConfig
from streams.errors import (
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from streams.mock_llm import MockBehaviour, MockLLM
from streams.upstream import UpstreamClient, parse_retry_after


def test_retry_after_forms() -> None:
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": formatdate(1000.0 + 30, usegmt=True)}, now=1000.0) == 30
    assert parse_retry_after({"x-ratelimit-reset-requests": "1m30s",
                              "x-ratelimit-reset-tokens": "250ms"}) == 90.0
    assert parse_retry_after({"x-ratelimit-reset-tokens": "6s"}) == 6.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


@pytest.fixture
async def mock() -> AsyncIterator[tuple[MockLLM, str]]:
    llm = MockLLM(MockBehaviour())
    server = TestServer(llm.app())
    await server.start_server()
    try:
        yield llm, f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.close()


def ep(url: str, **kw: object) -> EndpointConfig:
    return EndpointConfig(name="m", url=url, **kw)  # type: ignore[arg-type]


async def test_success_and_auth_header_sent(mock: tuple[MockLLM, str]) -> None:
    llm, url = mock
    async with aiohttp.ClientSession() as s:
        body = await UpstreamClient(s).complete(
            ep(url, api_key=SecretStr("sk-1")), "gpt", [{"role": "user", "content": "hi"}],
            {"max_tokens": 5},
        )
    assert body["choices"][0]["message"]["content"].startswith("mock answer")
    assert body["usage"]["total_tokens"] > 0 and llm.stats.calls == 1


async def test_status_errors_are_classified(mock: tuple[MockLLM, str]) -> None:
    llm, url = mock
    llm.behaviour.down = True
    llm.behaviour.status_on_error = 429
    llm.behaviour.retry_after = 2
    async with aiohttp.ClientSession() as s:
        with pytest.raises(UpstreamStatusError) as info:
            await UpstreamClient(s).complete(ep(url), "m", [{"role": "user", "content": "x"}], {})
        assert info.value.status == 429 and info.value.retryable and info.value.retry_after == 2
        assert "mock failure" in str(info.value)
        llm.behaviour.status_on_error = 400
        with pytest.raises(UpstreamStatusError) as info:
            await UpstreamClient(s).complete(ep(url), "m", [{"role": "user", "content": "x"}], {})
        assert not info.value.retryable


async def test_timeout_and_connection_refused(mock: tuple[MockLLM, str]) -> None:
    llm, url = mock
    llm.behaviour.latency_ms = 2000
    async with aiohttp.ClientSession() as s:
        with pytest.raises(UpstreamTimeout):
            await UpstreamClient(s).complete(ep(url, timeout_seconds=0.1), "m", [], {})
        with pytest.raises(UpstreamConnectionError) as info:
            await UpstreamClient(s).complete(ep("http://127.0.0.1:1/v1"), "m", [], {})
        assert info.value.retryable


async def test_non_completion_body_is_bad_response() -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(UpstreamBadResponse):
                await UpstreamClient(s).complete(
                    ep(f"http://127.0.0.1:{server.port}/v1"), "m", [], {}
                )
    finally:
        await server.close()
