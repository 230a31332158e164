"""The mock's structured answers: a schema-valid JSON value derived from the prompt, or an invalid one.

``schema_answer`` fills what a JSON Schema requires (required properties, ``minItems``
items, enums, bounds) with values chosen by a hash of the prompt, so the same prompt gets
the same answer. ``invalid_answer`` is what a misbehaving model sends: text that is not
JSON, or JSON that breaks the schema (a required property missing, a wrong type).

Usage::

    text = orjson.dumps(schema_answer(schema, prompt)).decode()
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

MAX_DEPTH = 8


def _seed(prompt: str, path: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{path}\0{prompt}".encode(), digest_size=8).digest())


def schema_answer(schema: Any, prompt: str, path: str = "$", depth: int = 0) -> Any:
    """A value valid against the (simple) ``schema``, deterministic in ``prompt``."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return None
    n = _seed(prompt, path)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][n % len(schema["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema_answer(schema[key][0], prompt, path, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        names = list(props)  # every property (strict mode requires all of them anyway)
        names += [r for r in schema.get("required") or () if r not in props]
        return {k: schema_answer(props.get(k, {}), prompt, f"{path}.{k}", depth + 1)
                for k in names}
    if kind == "array":
        count = max(int(schema.get("minItems", 1)), 1)
        count = min(count, int(schema.get("maxItems", count)))
        item = schema.get("items") or {}
        return [schema_answer(item, prompt, f"{path}[{i}]", depth + 1) for i in range(count)]
    if kind in ("integer", "number"):
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + 100))
        return low + n % (high - low + 1) if high >= low else low
    if kind == "boolean":
        return n % 2 == 0
    if kind == "null":
        return None
    text = f"mock {n:016x}"[: int(schema.get("maxLength", 64))]
    return text.ljust(int(schema.get("minLength", 0)), "x")


def invalid_answer(schema: Any, prompt: str, kind: str) -> str:
    """``kind`` "json": not JSON at all; "schema": JSON that breaks ``schema``."""
    valid = schema_answer(schema, prompt)
    if kind == "json":
        return orjson.dumps(valid).decode()[:-1] + " (truncated"
    required = schema.get("required") if isinstance(schema, dict) else None
    if isinstance(valid, dict) and required:
        valid.pop(required[0], None)
        return orjson.dumps(valid).decode()
    return orjson.dumps({"unexpected": [valid]} if not isinstance(valid, dict) else [valid]).decode()


def response_schema(body: dict[str, Any]) -> tuple[bool, Any]:
    """(a JSON answer is asked for, its schema or None) from the request's ``response_format``."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return False, None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        return True, spec.get("schema") if isinstance(spec, dict) else None
    return fmt.get("type") == "json_object", None
