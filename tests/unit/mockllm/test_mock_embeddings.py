"""The mock's /v1/embeddings: vectors derived from each input, a chosen input refused with 400."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mockllm.embeddings import input_tokens, vector_base64, vector_for
from mockllm.server import MockBehaviour, MockLLM


@pytest.fixture
async def mock() -> AsyncIterator[tuple[MockLLM, str]]:
    llm = MockLLM(MockBehaviour(), rng=random.Random(7))
    server = TestServer(llm.app())
    await server.start_server()
    yield llm, str(server.make_url(""))
    await server.close()


async def _post(url: str, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}{path}", json=body) as r:
        return r.status, await r.json()


async def test_each_input_gets_its_own_vector(mock: tuple[MockLLM, str]) -> None:
    llm, url = mock
    texts = ["alpha", "beta", "a longer text of some characters"]
    status, body = await _post(url, "/v1/embeddings", {"model": "m", "input": texts})
    assert status == 200
    assert [d["embedding"] for d in body["data"]] == [vector_for(t) for t in texts]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == sum(input_tokens(t) for t in texts)
    status, body = await _post(url, "/v1/embeddings", {"model": "m", "input": "x",
                                                       "dimensions": 5, "encoding_format": "base64"})
    assert status == 200 and body["data"][0]["embedding"] == vector_base64("x", 5)
    stats = (await _post(url, "/config", {}))[1]
    assert stats["refuse_inputs"] == []
    async with aiohttp.ClientSession() as s, s.get(f"{url}/stats?log=1") as r:
        log = (await r.json())["calls_log"]
    assert [c["inputs"] for c in log] == [texts, ["x"]]
    assert llm.stats.ok == 2


async def test_a_refused_input_fails_its_call_with_400(mock: tuple[MockLLM, str]) -> None:
    _, url = mock
    assert (await _post(url, "/config", {"refuse_inputs": ["bad"]}))[0] == 200
    status, body = await _post(url, "/v1/embeddings", {"model": "m", "input": ["ok", "bad"]})
    assert status == 400 and "input 1" in body["error"]["message"]
    assert (await _post(url, "/v1/embeddings", {"model": "m", "input": ["ok"]}))[0] == 200
    assert (await _post(url, "/config", {"refuse_inputs": "bad"}))[0] == 400


@pytest.mark.parametrize("body", [{"input": []}, {"input": [1]}, {"input": "x", "dimensions": 0},
                                  {"messages": []}])
async def test_malformed_embedding_calls_are_400(mock: tuple[MockLLM, str], body: Any) -> None:
    assert (await _post(mock[1], "/v1/embeddings", body))[0] == 400
