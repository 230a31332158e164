"""``UpstreamClient.embed``: one /embeddings call for many inputs, its body checked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mockllm.embeddings import vector_for
from mockllm.server import MockBehaviour, MockLLM
from streams.config import EndpointConfig
from streams.dispatch.upstream import UpstreamClient
from streams.dispatch.vectors import read_vectors
from streams.errors import UpstreamBadResponse, UpstreamStatusError


def ep(url: str, **kw: object) -> EndpointConfig:
    return EndpointConfig(name="m", url=url, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], object]]:
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}/v1"

    yield start
    for s in servers:
        await s.close()


async def test_embed_calls_the_mock_and_reads_every_vector(serve: object) -> None:
    llm = MockLLM(MockBehaviour())
    url = await serve(llm.app())  # type: ignore[operator]
    async with aiohttp.ClientSession() as s:
        body = await UpstreamClient(s).embed(ep(url), "emb", ["a", "b"], {"dimensions": 4})
        assert [v for v, _ in read_vectors(body, 2, endpoint="m", status=200)] == [
            vector_for("a", 4), vector_for("b", 4)]
        llm.behaviour.refuse_inputs = ["b"]
        with pytest.raises(UpstreamStatusError) as info:
            await UpstreamClient(s).embed(ep(url), "emb", ["a", "b"], {})
        assert info.value.status == 400 and "input 1" in str(info.value)


@pytest.mark.parametrize("reply", [
    web.Response(text="<html>502</html>", content_type="text/html"),
    web.json_response([1, 2]),
    web.Response(body=b"x" * 5000, content_type="application/json"),
])
async def test_embed_refuses_what_is_not_an_object_or_too_large(serve: object,
                                                               reply: web.Response) -> None:
    async def handler(_: web.Request) -> web.Response:
        return reply

    app = web.Application()
    app.router.add_post("/v1/embeddings", handler)
    url = await serve(app)  # type: ignore[operator]
    async with aiohttp.ClientSession() as s:
        client = UpstreamClient(s, embedding_bytes_per_input=1024)
        with pytest.raises(UpstreamBadResponse):
            await client.embed(ep(url, max_response_bytes=1024), "m", ["x"], {})
