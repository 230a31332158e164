"""A fast yes for answers valid against a common subset of JSON Schema; ``jsonschema`` decides the rest.

Why our own: ``jsonschema`` takes ~70-140 us per answer here, most of a pipeline's whole
per-event cost (BENCHMARKS.md, scenario 7), and fastjsonschema lacks draft 2020-12. The
compiled check is only ever trusted to say *valid*: a schema with any keyword outside
``KEYWORDS`` gets no fast check at all, and an answer it rejects is checked again by
``jsonschema`` (which lists the errors). So it can make validation faster, never laxer
(a property test compares it with ``jsonschema``).

Usage::

    fast = compile_fast(schema)          # None: the schema is outside the subset
    if fast is not None and fast(value): ...valid...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema",
                         "$id", "deprecated", "readOnly", "writeOnly"})
KEYWORDS = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties",
                      "items", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
                      "exclusiveMaximum", "minLength", "maxLength", "anyOf", "allOf"}) | ANNOTATIONS


class _Unsupported(Exception):
    pass


def _is_int(v: Any) -> bool:
    kind = type(v)
    return kind is int or (kind is float and v.is_integer())


_TYPES: dict[str, Check] = {
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "string": lambda v: type(v) is str,
    "integer": _is_int,
    "number": lambda v: type(v) is int or type(v) is float,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


def _is_num(v: Any) -> bool:
    return type(v) is int or type(v) is float


def compile_fast(schema: Any) -> Check | None:
    """A check that says True only for values ``jsonschema`` accepts; None if unsupported."""
    try:
        return _compile(schema)
    except _Unsupported:
        return None


def _compile(schema: Any) -> Check:  # noqa: C901 - one branch per keyword reads best
    if schema is True:
        return lambda v: True
    if schema is False:
        return lambda v: False
    if not isinstance(schema, dict) or not KEYWORDS.issuperset(schema):
        raise _Unsupported
    checks: list[Check] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not all(isinstance(n, str) and n in _TYPES for n in names):
            raise _Unsupported
        fns = [_TYPES[n] for n in names]
        checks.append(lambda v: any(f(v) for f in fns))
    for key in ("enum", "const"):
        if key in schema:
            # strings (and null) only: JSON equality differs from Python's for 1, 1.0, true
            allowed = schema[key] if key == "enum" else [schema[key]]
            if not isinstance(allowed, list) or not all(a is None or type(a) is str for a in allowed):
                raise _Unsupported
            checks.append(_member_of(frozenset(allowed)))
    checks += _object_checks(schema) + _array_checks(schema) + _scalar_checks(schema)
    if "anyOf" in schema:
        anys = [_compile(s) for s in _schemas(schema["anyOf"])]
        checks.append(lambda v: any(f(v) for f in anys))
    if "allOf" in schema:
        alls = [_compile(s) for s in _schemas(schema["allOf"])]
        checks.append(lambda v: all(f(v) for f in alls))
    return lambda v: all(c(v) for c in checks)


def _schemas(value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise _Unsupported
    return value


def _object_checks(schema: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise _Unsupported
    compiled = {k: _compile(s) for k, s in props.items()}
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _Unsupported
    extra = schema.get("additionalProperties", True)
    extra_check = _compile(extra)

    def obj(v: Any) -> bool:
        if type(v) is not dict:
            return True
        for r in required:
            if r not in v:
                return False
        for k, item in v.items():
            f = compiled.get(k)
            if f is not None:
                if not f(item):
                    return False
            elif extra is not True and not extra_check(item):
                return False
        return True

    if compiled or required or extra is not True:
        checks.append(obj)
    return checks


def _array_checks(schema: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    if "items" in schema:
        item = _compile(schema["items"])
        checks.append(lambda v: type(v) is not list or all(item(x) for x in v))
    lo, hi = _bound(schema, "minItems"), _bound(schema, "maxItems")
    if lo is not None or hi is not None:
        checks.append(lambda v: type(v) is not list or _within(len(v), lo, hi))
    return checks


def _scalar_checks(schema: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    lo, hi = _bound(schema, "minLength"), _bound(schema, "maxLength")
    if lo is not None or hi is not None:
        checks.append(lambda v: type(v) is not str or _within(len(v), lo, hi))
    for key, ok in _BOUNDS:
        if key in schema:
            bound = schema[key]
            if not _is_num(bound):
                raise _Unsupported
            checks.append(_bounded(ok, bound))
    return checks


_BOUNDS: tuple[tuple[str, Callable[[Any, Any], bool]], ...] = (
    ("minimum", lambda v, b: v >= b), ("maximum", lambda v, b: v <= b),
    ("exclusiveMinimum", lambda v, b: v > b), ("exclusiveMaximum", lambda v, b: v < b))


def _bounded(ok: Callable[[Any, Any], bool], bound: Any) -> Check:
    return lambda v: not _is_num(v) or ok(v, bound)


def _member_of(members: frozenset[str | None]) -> Check:
    return lambda v: (v is None or type(v) is str) and v in members


def _bound(schema: dict[str, Any], key: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise _Unsupported
    return int(value)


def _within(n: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or n >= lo) and (hi is None or n <= hi)
