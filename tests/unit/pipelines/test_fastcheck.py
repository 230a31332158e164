"""The fast schema check never says valid where jsonschema says invalid (Hypothesis)."""

from __future__ import annotations

from typing import Any

import jsonschema
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mockllm.structured import schema_answer
from streams.pipelines.fastcheck import compile_fast
from tests.unit.pipelines.conftest import SCHEMA

SCALAR_SCHEMAS = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean",
                                                     "null", "object", "array"])}),
    st.fixed_dictionaries({"type": st.just("string")},
                          optional={"minLength": st.integers(0, 3), "maxLength": st.integers(0, 5),
                                    "enum": st.lists(st.text(max_size=2), min_size=1, max_size=3)}),
    st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])},
                          optional={"minimum": st.integers(-3, 3) | st.floats(-3, 3),
                                    "maximum": st.integers(-3, 3),
                                    "exclusiveMinimum": st.integers(-3, 3),
                                    "exclusiveMaximum": st.floats(-3, 3)}),
    st.builds(lambda c: {"const": c}, st.text(max_size=2) | st.none()),
    st.just(True), st.just(False), st.just({}),
)


def _compound(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    obj = st.builds(
        lambda props, req, extra: {"type": "object", "properties": props,
                                   "required": [k for k in req if k in props] or list(props)[:1],
                                   "additionalProperties": extra},
        st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
        st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
        st.booleans() | inner)
    arr = st.builds(lambda items, lo: {"type": "array", "items": items, "minItems": lo},
                    inner, st.integers(0, 2))
    combo = st.builds(lambda k, subs: {k: subs}, st.sampled_from(["anyOf", "allOf"]),
                      st.lists(inner, min_size=1, max_size=3))
    return obj | arr | combo | st.builds(lambda t, s: {"type": t, **s} if isinstance(s, dict) else s,
                                        st.just(["string", "null"]), st.just({"maxLength": 2}))


SCHEMAS = st.recursive(SCALAR_SCHEMAS, _compound, max_leaves=8)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-5, 5, allow_nan=False)
    | st.sampled_from([1.0, 0.0, 2.5]) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, max_size=4),
    max_leaves=10,
)


@hsettings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, value=VALUES)
def test_fast_yes_implies_jsonschema_yes(schema: Any, value: Any) -> None:
    fast = compile_fast(schema)
    assert fast is not None, schema
    if fast(value):
        assert jsonschema.Draft202012Validator(schema).is_valid(value), (schema, value)
    else:  # not needed for soundness; exactness keeps valid answers on the fast path
        assert not jsonschema.Draft202012Validator(schema).is_valid(value), (schema, value)


@hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, prompt=st.text(max_size=10))
def test_fast_agrees_on_answers_the_mock_makes(schema: Any, prompt: str) -> None:
    """Within the subset it is exact, so valid answers take the fast path."""
    value = schema_answer(schema, prompt)
    fast = compile_fast(schema)
    assert fast is not None
    assert fast(value) == jsonschema.Draft202012Validator(schema).is_valid(value), (schema, value)


def test_outside_the_subset_there_is_no_fast_check_and_the_usual_schema_has_one() -> None:
    for schema in ({"type": "string", "pattern": "a+"}, {"$ref": "#/$defs/x"},
                   {"enum": [1, True]}, {"prefixItems": [{}]}, {"items": [{}]}):
        assert compile_fast(schema) is None
    fast = compile_fast(SCHEMA)
    assert fast is not None and fast({"category": "bug", "urgency": 2})
    assert not fast({"category": "bug", "urgency": 2.5}) and not fast({"category": "bug"})
    assert not fast({"category": "bug", "urgency": True}) and fast({"category": "bug", "urgency": 2.0})
    both = compile_fast({"enum": ["a", "b"], "const": "a"})  # each keeps its own members
    assert both is not None and both("a") and not both("b")
