"""An embedding pipeline on the real broker and Redis with the project's mock: events in, vectors out."""

from __future__ import annotations

from typing import Any

from mockllm.embeddings import vector_for
from tests.integration.harness import Collector, Mock, Stack, encode, produce, start_worker

NAME = "docs-embed"
DIMS = 8


def text_of(doc: dict[str, Any]) -> str:
    """What the pipeline's ``prompt.input`` renders for ``doc``."""
    return f"{doc['title']}\n\n{doc['body']}"


async def test_each_event_gets_the_vector_of_its_rendered_input(
        stack: Stack, mocks: list[Mock]) -> None:
    source = f"it-{stack.name}.docs"
    stack.overrides["pipelines"] = [{
        "name": NAME, "source": source, "sink": stack.responses, "dead_letter": stack.dlq,
        "model": "text-embedding-3-small", "id": "{{ event.id }}",
        "params": {"dimensions": DIMS},
        "prompt": {"input": "{{ event.title }}\n\n{{ event.body }}"},
        "output": {"format": "embedding", "field": "embedding"},
    }]
    n = 300
    docs = [{"id": f"D-{i}", "title": f"doc {i}", "body": f"about topic {i * 7 % 31}"}
            for i in range(n)]
    worker = start_worker(stack, args=("--pipeline", NAME))
    try:
        await worker.ready()
        async with Collector(stack) as col:
            await produce(source, encode(docs), keys=[d["id"].encode() for d in docs])
            outs = list(await col.wait_for(n, timeout=180))
            # the same text again under another id: served from the cache
            again = {**docs[5], "id": "D-again"}
            await produce(source, encode([again]))
            later = await col.wait_for(n + 1, timeout=60)
    finally:
        assert worker.stop() == 0
    assert all(o.topic == stack.responses for o in later), [o.value for o in later
                                                            if o.topic != stack.responses][:1]
    by_id = {o.value["id"]: o for o in outs}
    assert len(outs) == n and set(by_id) == {d["id"] for d in docs}
    sizes = []
    for d in docs:
        o = by_id[d["id"]]
        assert o.key == d["id"].encode() and o.value["title"] == d["title"]
        assert o.value["embedding"] == vector_for(text_of(d), DIMS), d
        llm = o.value["_llm"]
        assert llm["id"] == d["id"] and llm["model"] == "text-embedding-3-small"
        assert llm["dimensions"] == DIMS and llm["cached"] is False and llm["attempts"] >= 1
        assert llm["endpoint"] in ("mock-a", "mock-b") and llm["usage"]["total_tokens"] >= 1
        assert llm["prompt_version"]
        sizes.append(llm["batch_size"])
    assert max(sizes) > 1, "events were not batched across records"
    [hit] = [o for o in later if o.value["id"] == "D-again"]
    assert hit.value["embedding"] == vector_for(text_of(docs[5]), DIMS)
    assert hit.value["_llm"]["cached"] is True and hit.value["_llm"]["endpoint"] is None
