"""Any event a topic may hold: one request or one dead-letter error, never a crash (Hypothesis)."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mockllm.structured import invalid_answer, schema_answer
from streams.contract import Completion
from streams.errors import ValidationFailed
from tests.unit.pipelines.conftest import (
    SCHEMA,
    Rig,
    ScriptedModel,
    body,
    event,
    pipeline,
    settings,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
RIG = Rig(settings(pipeline(id=None, tenant="{{ event.t }}",
                            prompt={"user": "{{ event.subject }} / {{ event | tojson }}"})),
          ScriptedModel())
HEADERS = st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=20)), max_size=3) | st.none()
NULL_HEADERS = [("trace", None)]


@hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=st.binary(max_size=200) | JSON.map(orjson.dumps)
       | st.dictionaries(st.sampled_from(["subject", "t", "x"]), JSON).map(orjson.dumps),
       headers=HEADERS)
def test_any_event_renders_or_is_a_validation_or_template_error(
        value: bytes, headers: list[tuple[str, bytes]] | None) -> None:
    rec = event(0, value, headers)
    try:
        req = RIG.front.parse(rec)
    except ValidationFailed as exc:  # TemplateFailed is one
        assert exc.dlq_type in ("validation", "template") and str(exc)
        return
    assert req.id == "tickets-0-0" and req.messages
    answer = orjson.dumps(schema_answer(SCHEMA, str(req.chat_messages()))).decode()
    out = orjson.loads(RIG.front.record(rec, req, Completion("m", body(answer), "a", 1), 5, None))
    jsonschema.validate(out["triage"], SCHEMA)
    assert out["_llm"]["prompt_version"] == RIG.front.pipe.prompt_version
    assert RIG.front.headers(rec) == (headers or None)


def test_a_null_header_value_travels_as_empty_bytes() -> None:
    assert RIG.front.headers(event(0, b"{}", NULL_HEADERS)) == [("trace", b"")]  # type: ignore[arg-type]


SCHEMAS = st.sampled_from([
    SCHEMA,
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]},
                                      "aspects": {"type": "array", "minItems": 2, "items": {
                                          "type": "object", "required": ["aspect"],
                                          "properties": {"aspect": {"type": "string",
                                                                    "minLength": 3}}}}},
     "required": ["sentiment", "aspects"]},
    {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5}, "maxItems": 3},
    {"type": ["string", "null"], "maxLength": 4},
    {"anyOf": [{"type": "boolean"}, {"type": "integer"}]},
])


@hsettings(max_examples=200, deadline=None)
@given(schema=SCHEMAS, prompt=st.text(max_size=50))
def test_the_mock_answers_valid_and_deterministic_and_invalid_when_asked(
        schema: dict[str, Any], prompt: str) -> None:
    answer = schema_answer(schema, prompt)
    jsonschema.validate(answer, schema)
    assert schema_answer(schema, prompt) == answer
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(invalid_answer(schema, prompt, "json"))
    if schema.get("required"):
        broken = orjson.loads(invalid_answer(schema, prompt, "schema"))
        assert not jsonschema.Draft202012Validator(schema).is_valid(broken)
