"""A pipeline ready to run: compiled templates and schema, its prompt version, its worker settings.

``compile_pipeline`` raises one ``ConfigError`` line naming the pipeline and the problem
(the CLI exits 2). ``pipeline_settings`` derives the settings a pipeline's worker runs with:
its source as the requests topic, its sink as the responses topic, its dead-letter topic, its
consumer group and only its endpoints; everything else (limits, cache, retries) is shared.

Usage::

    pipe = compile_pipeline(settings, "triage")
    worker_settings = pipeline_settings(settings, pipe.cfg)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from streams.config import Settings
from streams.errors import ConfigError
from streams.pipelines.schema import OutputChecker
from streams.pipelines.settings import PipelineConfig
from streams.pipelines.templates import Template, compile_template


@dataclass(frozen=True, slots=True)
class CompiledPipeline:
    cfg: PipelineConfig
    system: Template | None
    few_shot: tuple[tuple[Template, Template], ...]
    user: Template | None  # None for output.format embedding
    id: Template | None
    tenant: Template | None
    priority: Template | int
    checker: OutputChecker
    prompt_version: str
    input: Template | None = None  # output.format embedding: the text embedded

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def embeds(self) -> bool:
        """True for ``output.format: embedding`` (an embedding request per event)."""
        return self.input is not None

    def response_format(self) -> dict[str, Any] | None:
        """The ``response_format`` parameter sent upstream (None for text or schemaless JSON)."""
        schema = self.checker.schema
        if schema is None:
            return {"type": "json_object"} if self.checker.is_json else None
        return {"type": "json_schema",
                "json_schema": {"name": _schema_name(self.name), "schema": schema,
                                "strict": self.cfg.output.strict}}


def _schema_name(name: str) -> str:
    # OpenAI: ^[a-zA-Z0-9_-]{1,64}$
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64]


def prompt_version(cfg: PipelineConfig, schema: dict[str, Any] | None) -> str:
    """A short hash of what shapes the answer: model, params, templates, schema, output."""
    prompt = cfg.prompt.model_dump()
    if prompt["input"] is None:  # versions of chat pipelines stay what they were before it
        del prompt["input"]
    doc = {"model": cfg.model, "params": cfg.params, "prompt": prompt,
           "output": cfg.output.model_dump(exclude={"schema_"}), "schema": schema}
    return hashlib.blake2b(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS),
                           digest_size=6).hexdigest()


def find(settings: Settings, name: str) -> PipelineConfig:
    for p in settings.pipelines:
        if p.name == name:
            return p
    known = ", ".join(p.name for p in settings.pipelines) or "none configured"
    raise ConfigError(f"unknown pipeline {name!r} (pipelines: {known})")


def compile_pipeline(settings: Settings, name: str) -> CompiledPipeline:
    """The named pipeline compiled; raises ``ConfigError`` (one line) on any problem."""
    cfg = find(settings, name)

    def tpl(where: str, source: str) -> Template:
        return compile_template(where, source, pipeline=name)

    p = cfg.prompt
    checker = OutputChecker.compile(cfg.output, pipeline=name)
    priority = cfg.priority if isinstance(cfg.priority, int) else tpl("priority", cfg.priority)
    return CompiledPipeline(
        cfg=cfg,
        system=tpl("prompt.system", p.system) if p.system is not None else None,
        few_shot=tuple((tpl(f"prompt.few_shot[{i}].user", ex.user),
                        tpl(f"prompt.few_shot[{i}].assistant", ex.assistant))
                       for i, ex in enumerate(p.few_shot)),
        user=tpl("prompt.user", p.user) if p.user is not None else None,
        id=tpl("id", cfg.id) if cfg.id is not None else None,
        tenant=tpl("tenant", cfg.tenant) if cfg.tenant is not None else None,
        priority=priority,
        checker=checker,
        prompt_version=prompt_version(cfg, checker.schema),
        input=tpl("prompt.input", p.input) if p.input is not None else None,
    )


def compile_all(settings: Settings) -> list[CompiledPipeline]:
    """Every configured pipeline compiled (the worker checks them all at start)."""
    return [compile_pipeline(settings, p.name) for p in settings.pipelines]


def pipeline_settings(settings: Settings, cfg: PipelineConfig) -> Settings:
    """The settings a worker of this pipeline runs with (see the module docstring)."""
    endpoints = settings.endpoints
    if cfg.endpoints is not None:
        endpoints = [e for e in endpoints if e.name in cfg.endpoints]
    return settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"group_id": cfg.group(settings.kafka.group_id)}),
        "topics": settings.topics.model_copy(update={
            "requests": cfg.source, "responses": cfg.sink, "dead_letter": cfg.dead_letter_topic}),
        "endpoints": endpoints,
        "worker": settings.worker.model_copy(update={"default_model": cfg.model}),
    })
