from __future__ import annotations

import gzip
import math
from collections.abc import AsyncIterator
from email.utils import format_datetime, formatdate
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from mockllm.server import MockBehaviour, MockLLM
from streams.config import EndpointConfig
from streams.contract import Completion, upstream_usage
from streams.dispatch.upstream import MAX_WAIT_SECONDS, UpstreamClient, parse_retry_after
from streams.errors import (
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tests.fakes.mock_server import serving_mock


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
    async with serving_mock(MockBehaviour()) as served:
        yield served


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


# ---- hostile wait headers ------------------------------------------------------------------

WAIT_HEADERS = ("Retry-After", "retry-after-ms", "x-ratelimit-reset-requests",
                "x-ratelimit-reset-tokens")
NASTY = ("NaN", "nan", "-nan", "inf", "-inf", "Infinity", "1e999", "1e308", "-5", "-0.5",
         "9" * 400, "1_000", "0x10", "", " ", "5s5", "ms", "1m-30s", "1e3s", "\u0661",
         "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT", "Sun, 99 Foo 2024",
         "Wed, 21 Oct 2015 07:28:00 +9999")


def _bounded(value: float | None) -> bool:
    return value is None or (math.isfinite(value) and 0.0 <= value <= MAX_WAIT_SECONDS)


@pytest.mark.parametrize("value", NASTY)
@pytest.mark.parametrize("header", WAIT_HEADERS)
def test_a_hostile_wait_header_is_ignored_or_bounded(header: str, value: str) -> None:
    assert _bounded(parse_retry_after({header: value}, now=1_700_000_000.0))


def test_non_finite_waits_are_ignored_as_if_absent() -> None:
    for value in ("NaN", "inf", "-inf", "1e999", "-3"):
        assert parse_retry_after({"Retry-After": value}) is None
        assert parse_retry_after({"x-ratelimit-reset-tokens": value}) is None
    # a broken header does not hide a good one
    assert parse_retry_after({"retry-after-ms": "nan", "Retry-After": "3"}) == 3.0
    assert parse_retry_after({"Retry-After": "NaN", "x-ratelimit-reset-requests": "2s"}) == 2.0
    assert parse_retry_after({"x-ratelimit-reset-requests": "inf",
                              "x-ratelimit-reset-tokens": "1s"}) == 1.0
    # huge but well-formed: clamped (and capped again by retry.max_retry_after_ms later)
    assert parse_retry_after({"Retry-After": "9" * 60}) == MAX_WAIT_SECONDS
    assert parse_retry_after({"retry-after-ms": "5000000000"}) == MAX_WAIT_SECONDS
    assert parse_retry_after({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}) == MAX_WAIT_SECONDS


@settings(max_examples=400)
@given(st.dictionaries(st.sampled_from(WAIT_HEADERS),
                       st.one_of(st.text(max_size=80), st.sampled_from(NASTY),
                                 st.floats().map(repr), st.integers().map(str),
                                 st.datetimes().map(lambda d: format_datetime(d)))),
       st.floats(min_value=0, max_value=4e9))
def test_any_wait_header_parses_to_none_or_finite_bounded_seconds(
    headers: dict[str, str], now: float
) -> None:
    assert _bounded(parse_retry_after(headers, now=now))


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999))
def test_well_formed_durations_parse_exactly(seconds: int, ms: int) -> None:
    assert parse_retry_after({"Retry-After": str(seconds)}) == min(seconds, MAX_WAIT_SECONDS)
    expected = min(seconds + ms / 1000, MAX_WAIT_SECONDS)
    got = parse_retry_after({"x-ratelimit-reset-tokens": f"{seconds}s{ms}ms"})
    assert got == pytest.approx(expected)


# ---- hostile bodies --------------------------------------------------------------------------

async def _call(url: str, **kw: object) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        return await UpstreamClient(s).complete(ep(url, **kw), "m",
                                                [{"role": "user", "content": "x"}], {})


@pytest.mark.parametrize("fault", ["no_choices", "not_json", "oversized"])
async def test_hostile_bodies_are_bad_responses(mock: tuple[MockLLM, str], fault: str) -> None:
    llm, url = mock
    llm.behaviour.faults = {fault: 1.0}
    llm.behaviour.oversize_bytes = 64 * 1024
    with pytest.raises(UpstreamBadResponse) as info:
        await _call(url, max_response_bytes=16 * 1024)
    assert not info.value.retryable and info.value.status == 200


async def test_a_chunked_body_over_the_cap_is_not_read_whole() -> None:
    sent = []

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # no Content-Length: chunked
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b" " * 4096)
            sent.append(1)
        await resp.write(b'{"choices": []}')
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        with pytest.raises(UpstreamBadResponse, match="max_response_bytes"):
            await _call(f"http://127.0.0.1:{server.port}/v1", max_response_bytes=16 * 1024)
        body = await _call(f"http://127.0.0.1:{server.port}/v1")  # default cap: fine
        assert body == {"choices": []}
    finally:
        await server.close()


async def test_a_compressed_body_is_capped_by_its_decompressed_size() -> None:
    bomb = gzip.compress(b'{"choices": [], "pad": "' + b" " * 2_000_000 + b'"}')

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        assert len(bomb) < 16 * 1024
        with pytest.raises(UpstreamBadResponse, match="max_response_bytes"):
            await _call(f"http://127.0.0.1:{server.port}/v1", max_response_bytes=64 * 1024)
    finally:
        await server.close()


async def test_a_completion_with_the_wrong_content_type_is_still_read(
    mock: tuple[MockLLM, str],
) -> None:
    llm, url = mock
    llm.behaviour.faults = {"wrong_type": 1.0}
    body = await _call(url)
    assert body["choices"][0]["message"]["content"].startswith("mock answer")


async def test_invalid_usage_is_returned_and_logged_at_most_once_per_interval(
    mock: tuple[MockLLM, str], caplog: pytest.LogCaptureFixture
) -> None:
    llm, url = mock
    llm.behaviour.faults = {"bad_usage": 1.0}
    now = [0.0]
    async with aiohttp.ClientSession() as s:
        client = UpstreamClient(s, log_interval=60.0, clock=lambda: now[0])
        for t in (0.0, 1.0, 59.0, 61.0):
            now[0] = t
            body = await client.complete(ep(url), "m", [{"role": "user", "content": "x"}], {})
            assert upstream_usage(body) is None and "choices" in body
    warned = [r for r in caplog.records if "invalid usage" in r.getMessage()]
    assert len(warned) == 2  # at 0 and at 61


async def test_hostile_headers_on_a_429_give_a_bounded_retry_after(
    mock: tuple[MockLLM, str],
) -> None:
    llm, url = mock
    llm.behaviour.down = True
    llm.behaviour.status_on_error = 429
    for value in ("NaN", "inf", "-1", "1e999", "garbage"):
        llm.behaviour.error_headers = [{"Retry-After": value, "x-ratelimit-reset-tokens": value}]
        with pytest.raises(UpstreamStatusError) as info:
            await _call(url)
        assert info.value.retry_after is None


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["choices", "usage", "message", "content", "x"]), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.one_of(_JSONISH.map(orjson.dumps), st.binary(max_size=64)),
       st.sampled_from([200, 201, 299]))
def test_any_2xx_body_is_a_completion_or_a_bad_response(raw: bytes, status: int) -> None:
    client = UpstreamClient(None)  # type: ignore[arg-type]  # _completion needs no session
    endpoint = ep("http://x.test/v1", max_response_bytes=1024)
    try:
        body = client._completion(raw if len(raw) <= 1024 else None, status, endpoint)
    except UpstreamBadResponse as exc:
        assert exc.status == status and not exc.retryable
        return
    assert isinstance(body, dict) and isinstance(body["choices"], list)
    comp = Completion(model="m", body=body, endpoint="m", attempts=1)
    assert all(type(v) is int and v >= 0 for v in comp.usage.values())
    assert comp.output is None or isinstance(comp.output, str)


async def test_structured_outputs_false_sends_the_schema_as_an_instruction(
        mock: tuple[MockLLM, str]) -> None:
    llm, url = mock
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s:
        native = await UpstreamClient(s).complete(ep(url), "m", messages,
                                                  {"response_format": fmt, "temperature": 0})
        plain = await UpstreamClient(s).complete(ep(url, structured_outputs=False), "m", messages,
                                                 {"response_format": fmt, "temperature": 0})
    assert orjson.loads(native["choices"][0]["message"]["content"]).keys() == {"n"}
    # no response_format reached the mock: a text answer, to a prompt that carries the schema
    text = plain["choices"][0]["message"]["content"]
    assert text.startswith("mock answer") and "Answer with only a JSON value" in text
    first, second = llm.stats.prompts
    assert second.startswith("Answer with only a JSON value") and orjson.dumps(schema).decode() in second
    assert first == "hi" and messages == [{"role": "user", "content": "hi"}]
