"""Structured output for endpoints without ``response_format`` support: the schema as an instruction.

OpenAI, Azure OpenAI, vLLM and Ollama take ``response_format: {type: json_schema, ...}``;
an endpoint configured with ``structured_outputs: false`` gets the schema as a system
instruction instead (the answer is validated either way: ``streams/pipelines/schema.py``).

Usage::

    messages, params = schema_as_instruction(messages, params)
"""

from __future__ import annotations

from typing import Any

import orjson

from streams.contract import ChatMessages, Params


def schema_as_instruction(messages: ChatMessages, params: Params) -> tuple[ChatMessages, Params]:
    """``params`` without a ``json_schema`` response_format, which becomes a system message."""
    fmt = params.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return messages, params
    spec: Any = fmt.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    text = ("Answer with only a JSON value, no prose and no code fence, that is valid against "
            "this JSON Schema:\n" + orjson.dumps(schema).decode())
    rest = {k: v for k, v in params.items() if k != "response_format"}
    return [{"role": "system", "content": text}, *messages], rest
