"""A pipeline on the processor's record path with fakes: settings, a scripted model, a run helper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from mockllm.structured import schema_answer
from streams.cache.responses import ResponseCache
from streams.config import Settings, load_settings
from streams.contract import Completion, Request, Source
from streams.intake.processor import InRecord, Processor
from streams.metrics import PipelineMetrics
from streams.pipelines.compiled import compile_pipeline, pipeline_settings
from streams.pipelines.front import PipelineFront
from tests.fakes.fake_redis import FakeRedis
from tests.fakes.publisher import FakePublisher

SCHEMA = {
    "type": "object",
    "properties": {"category": {"type": "string", "enum": ["billing", "bug", "other"]},
                   "urgency": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["category", "urgency"],
    "additionalProperties": False,
}


def pipeline(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "name": "triage", "source": "tickets", "sink": "tickets.out", "model": "gpt-4o-mini",
        "id": "{{ event.id }}",
        "prompt": {"system": "Triage.", "user": "Subject: {{ event.subject }}"},
        "output": {"format": "json", "schema": SCHEMA, "repair": 1, "field": "triage"},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(p.get(k), dict):
            p[k] = {**p[k], **v}
        else:
            p[k] = v
    return p


def settings(*pipelines: dict[str, Any]) -> Settings:
    return load_settings(environ={}, pipelines=list(pipelines or [pipeline()]))


def body(content: str) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


class ScriptedModel:
    """Answers from ``script`` in turn (then schema-valid ones); records each request."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[Request] = []

    async def dispatch(self, req: Request) -> Completion:
        self.requests.append(req)
        if self.script:
            content = self.script.pop(0)
        else:
            content = orjson.dumps(schema_answer(SCHEMA, str(req.chat_messages()))).decode()
        return Completion(req.model or "m", body(content), "a", 1, endpoints=["a"])


def event(offset: int, doc: Any, headers: list[tuple[str, bytes]] | None = None,
          topic: str = "tickets") -> InRecord:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return InRecord(Source(topic, 0, offset, 1_000), f"k{offset}".encode(), value, headers)


class Rig:
    def __init__(self, s: Settings, model: ScriptedModel, name: str = "triage") -> None:
        pipe = compile_pipeline(s, name)
        self.settings = pipeline_settings(s, pipe.cfg)
        self.registry = CollectorRegistry()
        self.front = PipelineFront(pipe, self.settings, self.registry)
        self.redis = FakeRedis()
        self.cache = ResponseCache(self.settings, self.redis, self.registry)  # type: ignore[arg-type]
        self.publisher = FakePublisher()
        self.model = model
        self.processor = Processor(self.settings, self.publisher, model, self.cache,
                                   PipelineMetrics(CollectorRegistry()), front=self.front)

    async def run(self, recs: list[InRecord]) -> dict[int, str]:
        done: dict[int, str] = {}

        def on_done(r: InRecord, outcome: str) -> None:
            assert r.source.offset not in done, "done twice"
            done[r.source.offset] = outcome

        await self.processor.process_batch(recs, on_done)
        await self.cache.aclose()  # writes go out
        return done

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"pipeline": "triage", **labels}) or 0.0


@pytest.fixture
def rig_factory() -> Callable[..., Rig]:
    def make(script: list[str] | None = None, *pipelines: dict[str, Any]) -> Rig:
        return Rig(settings(*pipelines), ScriptedModel(script))

    return make
