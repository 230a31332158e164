"""The mock endpoint's chaos mix and call log (an in-process server, no broker)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from mockllm.server import BAD_USAGES, MockBehaviour, MockLLM, check_faults, parse_faults


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def start(behaviour: MockBehaviour) -> tuple[MockLLM, str]:
        mock = MockLLM(behaviour, rng=random.Random(7))
        server = TestServer(mock.app())
        await server.start_server()
        servers.append(server)
        return mock, str(server.make_url(""))

    yield start
    for s in servers:
        await s.close()


async def _chat(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[int, dict[str, str]]:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    async with session.post(f"{url}/v1/chat/completions", json=body,
                            headers={"Authorization": "Bearer k"}) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_statuses_follow_the_mix_and_429_carries_retry_after(serve: Any) -> None:
    mock, url = await serve(MockBehaviour(faults={"500": 0.3, "429": 0.2}, retry_after=2.5))
    async with aiohttp.ClientSession() as s:
        got = [await _chat(s, url, f"p{i}") for i in range(400)]
    statuses = Counter(status for status, _ in got)
    assert set(statuses) == {200, 500, 429}
    assert 90 <= statuses[500] <= 150 and 50 <= statuses[429] <= 110
    assert all(h.get("Retry-After") == "2.5" for st, h in got if st == 429)
    assert all("Retry-After" not in h for st, h in got if st != 429)
    log = mock.stats.summary(with_log=True)
    entries = log["calls_log"]
    assert [e["prompt"] for e in entries] == [f"p{i}" for i in range(400)]
    assert {e["status"]: e["retry_after"] for e in entries if e["fault"] == "429"} == {429: 2.5}
    assert log["authorized"] == 400 and log["by_fault"] == {"500": statuses[500], "429": statuses[429]}


async def test_reset_aborts_the_connection_and_hang_outlasts_the_client(serve: Any) -> None:
    mock, url = await serve(MockBehaviour(faults={"reset": 1.0}))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            await _chat(s, url, "reset me")
    mock.behaviour.faults = {"hang": 1.0}
    mock.behaviour.hang_seconds = 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with pytest.raises(asyncio.TimeoutError):
            await _chat(s, url, "hang on")
    entries = mock.stats.summary(with_log=True)["calls_log"]
    assert [(e["prompt"], e["status"], e["fault"]) for e in entries] == [
        ("reset me", 0, "reset"), ("hang on", 0, "hang")]


async def test_config_rejects_a_bad_mix(serve: Any) -> None:
    mock, url = await serve(MockBehaviour())
    async with aiohttp.ClientSession() as s:
        for bad in ({"418x": 0.1}, {"500": 0.7, "hang": 0.4}, {"500": -1}, ["500"]):
            async with s.post(f"{url}/config", json={"faults": bad}) as resp:
                assert resp.status == 400, bad
        async with s.post(f"{url}/config", json={"faults": {"503": 0.5}}) as resp:
            assert resp.status == 200 and (await resp.json())["faults"] == {"503": 0.5}
    assert mock.behaviour.faults == {"503": 0.5}


def test_parse_faults() -> None:
    assert parse_faults("500=0.2, 429=0.1,hang=0.05,reset=0.05") == {
        "500": 0.2, "429": 0.1, "hang": 0.05, "reset": 0.05}
    assert parse_faults("") == {}
    for bad in ("500", "teapot=0.1", "500=0.9,429=0.2"):
        with pytest.raises(ValueError):
            parse_faults(bad)
    assert check_faults({"502": 1}) == {"502": 1.0}


async def test_hostile_answers_and_error_headers(serve: Any) -> None:
    mix = {"bad_usage": 0.2, "no_choices": 0.2, "not_json": 0.2, "wrong_type": 0.2, "429": 0.2}
    hostile = [{"Retry-After": "NaN"}, {"x-ratelimit-reset-tokens": "inf"}]
    mock, url = await serve(MockBehaviour(faults=mix, error_headers=hostile))
    seen: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as s:
        for i in range(200):
            body = {"model": "m", "messages": [{"role": "user", "content": f"p{i}"}]}
            async with s.post(f"{url}/v1/chat/completions", json=body) as resp:
                raw = await resp.read()
                kind = resp.content_type
                if resp.status == 429:
                    seen.setdefault("429", set()).update(
                        f"{k}: {v}" for k, v in resp.headers.items()
                        if k.lower().startswith(("retry", "x-ratelimit")))
                    continue
                assert resp.status == 200
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    seen.setdefault("not_json", set()).add(kind)
                    continue
                if "choices" not in doc:
                    seen.setdefault("no_choices", set()).add(kind)
                elif kind == "text/html":
                    seen.setdefault("wrong_type", set()).add(kind)
                elif doc["usage"] in BAD_USAGES:
                    seen.setdefault("bad_usage", set()).add(kind)
    assert seen["429"] == {"Retry-After: NaN", "x-ratelimit-reset-tokens: inf"}
    assert seen["not_json"] == {"text/html"} and seen["wrong_type"] == {"text/html"}
    assert seen["no_choices"] == {"application/json"} and "bad_usage" in seen
    assert sum(mock.stats.by_fault.values()) == 200


async def test_oversized_answer_and_bad_error_headers_config(serve: Any) -> None:
    mock, url = await serve(MockBehaviour(faults={"oversized": 1.0}, oversize_bytes=300_000))
    async with aiohttp.ClientSession() as s:
        status, _ = await _chat(s, url, "big")
        assert status == 200
        for bad in ({"Retry-After": "1"}, [{"Retry-After": 1}], ["x"]):
            async with s.post(f"{url}/config", json={"error_headers": bad}) as resp:
                assert resp.status == 400, bad
    assert check_faults({"not_json": 0.5, "oversized": 0.5}) == {"not_json": 0.5, "oversized": 0.5}


async def test_response_format_gets_a_schema_valid_answer_and_an_invalid_share(serve: Any) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}},
              "required": ["n"], "additionalProperties": False}
    _, url = await serve(MockBehaviour())
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}

    async def answer(session: aiohttp.ClientSession, prompt: str) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}],
                "response_format": fmt}
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            return str((await resp.json())["choices"][0]["message"]["content"])

    async with aiohttp.ClientSession() as s:
        first = await answer(s, "p1")
        jsonschema.validate(orjson.loads(first), schema)
        assert await answer(s, "p1") == first
        async with s.post(f"{url}/config", json={"invalid_share": 0.5}) as r:
            assert r.status == 200
        answers = [await answer(s, f"p{i}") for i in range(400)]
        stats = await (await s.get(f"{url}/stats")).json()
    valid = jsonschema.Draft202012Validator(schema)

    def ok(text: str) -> bool:
        try:
            return valid.is_valid(orjson.loads(text))
        except orjson.JSONDecodeError:
            return False

    bad = sum(not ok(a) for a in answers)
    assert 140 <= bad <= 260
    assert stats["by_fault"]["invalid_json"] + stats["by_fault"]["invalid_schema"] == bad
