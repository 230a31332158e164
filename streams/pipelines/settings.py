"""The ``pipelines:`` section of the configuration: one validated model per pipeline.

Only the shape is checked here (pydantic); templates and schemas are compiled at start by
``streams.pipelines.compiled.compile_pipeline``, which names the pipeline in its one-line
``ConfigError``. Cross-section checks (endpoint names, topics) are in ``check_pipelines``.

Usage::

    pipelines:
      - name: triage
        source: support.tickets
        sink: support.tickets.triaged
        model: gpt-4o-mini
        prompt: {system: "You triage tickets.", user: "{{ event.subject }}"}
        output: {format: json, schema: {type: object, required: [category]}}
      - name: docs-embed           # the event's text embedded; the vector in output.field
        source: docs
        sink: docs.embedded
        model: text-embedding-3-small
        params: {dimensions: 256}
        prompt: {input: "{{ event.title }}\n\n{{ event.body }}"}
        output: {format: embedding, field: vector}
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streams.contract import unrepresentable
from streams.embedding import check_embedding_params

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Parameters the pipeline sets itself (model, messages, response_format) or we cannot honour.
RESERVED_PARAMS = frozenset({"model", "messages", "stream", "response_format"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Example(_Section):
    """One few-shot example: a user message and the assistant's answer (both templates)."""

    user: str
    assistant: str


class PromptConfig(_Section):
    system: str | None = None
    user: str | None = Field(None, min_length=1)  # required for text and json
    few_shot: list[Example] = []
    input: str | None = Field(None, min_length=1)  # what ``format: embedding`` embeds


class OutputConfig(_Section):
    format: Literal["text", "json", "embedding"] = "text"
    # Inline JSON Schema (a mapping) or the path of a JSON file holding one.
    schema_: dict[str, Any] | str | None = Field(None, alias="schema")
    strict: bool = True  # sent as json_schema.strict
    repair: int = Field(1, ge=0, le=5)
    field: str = Field("llm", min_length=1, max_length=128)
    include_event: bool = True

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("field")
    @classmethod
    def _not_meta(cls, value: str) -> str:
        if value == "_llm":
            raise ValueError("'_llm' is the metadata field; choose another name")
        return value


class PipelineConfig(_Section):
    """One pipeline: read ``source``, prompt the model per event, write ``sink``."""

    name: str
    source: str = Field(min_length=1, max_length=249)
    sink: str = Field(min_length=1, max_length=249)
    dead_letter: str | None = Field(None, min_length=1, max_length=249)  # default <source>.dlq
    group_id: str | None = Field(None, min_length=1)  # default <kafka.group_id>.<name>
    model: str = Field(min_length=1, max_length=256)
    params: dict[str, Any] = {}
    endpoints: list[str] | None = Field(None, min_length=1)
    deadline_ms: int | None = Field(None, ge=1)
    id: str | None = None  # template; default: topic-partition-offset
    tenant: str | None = None  # template
    priority: str | int = 5  # template or a constant 0-9
    prompt: PromptConfig
    output: OutputConfig = OutputConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-' (a metric label)")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = RESERVED_PARAMS.intersection(value)
        if reserved:
            raise ValueError(f"may not set {sorted(reserved)}: the pipeline sends them")
        bad = unrepresentable(value, "params")
        if bad is not None:
            raise ValueError(bad)
        return value

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str | int) -> str | int:
        if isinstance(value, int) and not 0 <= value <= 9:
            raise ValueError("must be 0-9 (or a template)")
        return value

    @model_validator(mode="after")
    def _format_fits(self) -> PipelineConfig:
        problem = format_problem(self)
        if problem is not None:
            raise ValueError(f"pipeline {self.name}: {problem}")
        return self

    @property
    def dead_letter_topic(self) -> str:
        return self.dead_letter or f"{self.source}.dlq"

    def group(self, base: str) -> str:
        """The consumer group: ``group_id`` or ``<kafka.group_id>.<name>``."""
        return self.group_id or f"{base}.{self.name}"


# Output settings of chat answers (a schema, its validation, re-asks): not for a vector.
_CHAT_OUTPUT = ("schema_", "strict", "repair")


def format_problem(p: PipelineConfig) -> str | None:
    """What in the prompt, output or params does not fit ``output.format`` (None: all fits).

    ``embedding`` embeds ``prompt.input`` alone; ``text`` and ``json`` send chat messages."""
    prompt, out = p.prompt, p.output
    if out.format != "embedding":
        if prompt.input is not None:
            return "prompt.input is for output.format embedding (use prompt.user)"
        if prompt.user is None:
            return f"prompt.user is required for output.format {out.format}"
        return None
    if prompt.input is None:
        return "output.format embedding needs prompt.input (the text to embed)"
    chat = [f"prompt.{k}" for k in ("system", "user", "few_shot") if getattr(prompt, k)]
    chat += [f"output.{k.rstrip('_')}" for k in _CHAT_OUTPUT if k in out.model_fields_set]
    if chat:
        return f"{', '.join(chat)} not allowed with output.format embedding"
    try:
        check_embedding_params(p.params)
    except ValueError as exc:
        return str(exc)
    return None


def check_pipelines(pipelines: list[PipelineConfig], endpoints: dict[str, list[str] | None],
                    requests_topic: str) -> None:
    """Cross-section rules; raises ValueError naming the pipeline.

    ``endpoints``: each configured endpoint's models (None: any model).
    """
    names = [p.name for p in pipelines]
    if len(set(names)) != len(names):
        raise ValueError("pipeline names must be unique")
    for p in pipelines:
        topics = {p.source, p.sink, p.dead_letter_topic}
        if len(topics) != 3:
            raise ValueError(f"pipeline {p.name}: source, sink and dead_letter must differ")
        if requests_topic in topics:
            raise ValueError(f"pipeline {p.name}: topics.requests ({requests_topic}) is the "
                             "request topic's; give the pipeline its own topics")
        for name in p.endpoints or ():
            if name not in endpoints:
                raise ValueError(f"pipeline {p.name}: unknown endpoint {name!r}")
            models = endpoints[name]
            if models is not None and p.model not in models:
                raise ValueError(f"pipeline {p.name}: endpoint {name!r} does not serve {p.model}")
        if not any(m is None or p.model in m for m in endpoints.values()):
            raise ValueError(f"pipeline {p.name}: no endpoint serves model {p.model}")
