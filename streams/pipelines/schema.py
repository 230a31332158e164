"""Structured output: the pipeline's JSON Schema, the answer's parse and validation, the re-ask.

A schema that is not valid JSON Schema (or a file that cannot be read) is a ``ConfigError``
at start. An answer is checked in two steps: it must parse as JSON (a fenced ```json block is
accepted, as models add them when the schema is only an instruction), then validate; the
errors (at most ``MAX_ERRORS``, each with its JSON path) are what a repair re-ask shows the
model and what an ``invalid_output`` dead letter carries.

Usage::

    checker = OutputChecker.compile(cfg.output, pipeline="triage")
    value, errors = checker.check(answer_text)
    if errors: messages += repair_messages(answer_text, errors)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
from jsonschema.exceptions import SchemaError

from streams.errors import ConfigError
from streams.pipelines.fastcheck import compile_fast
from streams.pipelines.settings import OutputConfig

MAX_ERRORS = 5
ERROR_CHARS = 300  # per error message


def load_schema(given: dict[str, Any] | str, pipeline: str) -> dict[str, Any]:
    """The inline schema, or the one in the JSON file ``given`` names."""
    if isinstance(given, dict):
        return given
    try:
        doc = json.loads(Path(given).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"pipeline {pipeline}: cannot read output.schema file {given}: "
                          f"{exc.strerror}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"pipeline {pipeline}: output.schema file {given} is not JSON: "
                          f"{exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"pipeline {pipeline}: output.schema file {given} must hold an object")
    return doc


class OutputChecker:
    """Parses and validates answers of one pipeline (``format: json``; text passes as is)."""

    def __init__(self, cfg: OutputConfig, schema: dict[str, Any] | None,
                 validator: jsonschema.protocols.Validator | None) -> None:
        self.cfg = cfg
        self.schema = schema
        self._validator = validator
        self._fast = compile_fast(schema) if schema is not None else None

    @classmethod
    def compile(cls, cfg: OutputConfig, *, pipeline: str) -> OutputChecker:
        """Raises ``ConfigError`` naming the pipeline when the schema is not valid."""
        if cfg.format != "json":  # text; embedding (no answer text: front.py takes the vector)
            if cfg.schema_ is not None:
                raise ConfigError(f"pipeline {pipeline}: output.schema needs output.format json")
            return cls(cfg, None, None)
        if cfg.schema_ is None:
            return cls(cfg, None, None)  # any JSON value
        schema = load_schema(cfg.schema_, pipeline)
        kind = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            kind.check_schema(schema)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "(root)"
            raise ConfigError(f"pipeline {pipeline}: output.schema is not valid JSON Schema at "
                              f"{where}: {exc.message[:200]}") from None
        return cls(cfg, schema, kind(schema))

    @property
    def is_json(self) -> bool:
        return self.cfg.format == "json"

    def check(self, text: str | None, validate: bool = True) -> tuple[Any, list[str]]:
        """(the result, []) or (None, the errors). Never raises.

        ``validate`` False: parse only (an answer validated before)."""
        if text is None:
            return None, ["the answer has no text content"]
        if not self.is_json:
            return text, []
        try:
            value = orjson.loads(_unfenced(text))
        except orjson.JSONDecodeError as exc:
            return None, [f"the answer is not JSON: {exc}"[:ERROR_CHARS]]
        if self._validator is None or not validate:
            return value, []
        if self._fast is not None and self._fast(value):  # a sure yes (fastcheck.py)
            return value, []
        errors = []
        for err in self._validator.iter_errors(value):
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
            errors.append(f"${path}: {err.message}"[:ERROR_CHARS])
            if len(errors) >= MAX_ERRORS:
                break
        return (None, errors) if errors else (value, [])


def _unfenced(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        body = stripped[3:-3]
        return body[4:] if body.startswith("json") else body
    return stripped


def repair_messages(answer: str | None, errors: list[str]) -> list[dict[str, Any]]:
    """What a re-ask appends: the model's answer and the validator's errors."""
    listed = "\n".join(f"- {e}" for e in errors)
    return [
        {"role": "assistant", "content": answer or ""},
        {"role": "user", "content": "Your answer is not valid against the required JSON Schema:\n"
                                    f"{listed}\nAnswer again with only the corrected JSON."},
    ]
