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


@pytest.fixture
async def echo() -> AsyncIterator[tuple[list[web.Request], str]]:
    """An endpoint that records each request; a call with the key "refused" gets a 401
    quoting the key, as some servers do."""
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        key = request.headers.get("api-key") or request.headers.get("Authorization") or ""
        if "refused" in key:
            return web.json_response({"error": {"message": f"Incorrect API key: {key}"}},
                                     status=401)
        return web.json_response({"choices": [{"message": {"content": "hi"}}]})

    app = web.Application()
    app.router.add_post("/{path:.*}", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        yield seen, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_azure_deployment_url_api_version_and_api_key_header(
    echo: tuple[list[web.Request], str],
) -> None:
    seen, base = echo
    azure = ep(f"{base}/openai/deployments/gpt-4o-mini", api_key=SecretStr("az-key-1"),
               api_key_header="api-key", api_version="2024-10-21")
    async with aiohttp.ClientSession() as s:
        await UpstreamClient(s).complete(azure, "gpt-4o-mini", [], {})
    (req,) = seen
    assert req.path == "/openai/deployments/gpt-4o-mini/chat/completions"
    assert dict(req.query) == {"api-version": "2024-10-21"}
    assert req.headers["api-key"] == "az-key-1" and "Authorization" not in req.headers


async def test_bearer_by_default_and_no_auth_without_key(
    echo: tuple[list[web.Request], str],
) -> None:
    seen, base = echo
    async with aiohttp.ClientSession() as s:
        await UpstreamClient(s).complete(ep(f"{base}/v1", api_key=SecretStr("sk-2")), "m", [], {})
        await UpstreamClient(s).complete(ep(f"{base}/v1"), "m", [], {})
    assert seen[0].path == "/v1/chat/completions" and not seen[0].query
    assert seen[0].headers["Authorization"] == "Bearer sk-2"
    assert "Authorization" not in seen[1].headers and "api-key" not in seen[1].headers


@pytest.mark.parametrize("header", ["Authorization", "api-key"])
async def test_a_key_quoted_back_by_the_server_is_masked(
    echo: tuple[list[web.Request], str], header: str
) -> None:
    _, base = echo
    key = "sk-refused-0123456789"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(UpstreamStatusError) as info:
            await UpstreamClient(s).complete(
                ep(f"{base}/v1", api_key=SecretStr(key), api_key_header=header), "m", [], {}
            )
    assert info.value.status == 401 and not info.value.retryable
    assert key not in str(info.value) and "Incorrect API key" in str(info.value)
    assert "***" in str(info.value)
