"""A pipeline's events through the processor (fakes): enriched events, repairs, dead letters, cache."""

from __future__ import annotations

from collections.abc import Callable

import jsonschema
import orjson

from streams.cache.keys import cache_key
from streams.pipelines.compiled import compile_pipeline
from tests.unit.pipelines.conftest import SCHEMA, Rig, ScriptedModel, event, pipeline, settings

VALID = '{"category": "bug", "urgency": 4}'


async def test_an_event_becomes_an_enriched_event_with_key_and_headers(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    headers = [("trace", b"t-1"), ("tenant", b"acme")]
    done = await rig.run([event(7, {"id": "T-1", "subject": "refund", "triage": "old"}, headers)])
    assert done == {7: "ok"}
    ((topic, key, out),) = rig.publisher.out
    assert topic == "tickets.out" and key == b"k7" and rig.publisher.headers == [headers]
    jsonschema.validate(out["triage"], SCHEMA)
    assert out["id"] == "T-1" and out["subject"] == "refund"
    llm = out["_llm"]
    assert llm["id"] == "T-1" and llm["model"] == "gpt-4o-mini" and llm["endpoint"] == "a"
    assert llm["attempts"] == 1 and llm["cached"] is False and llm["replaced"] == ["triage"]
    assert llm["prompt_version"] == rig.front.pipe.prompt_version and llm["usage"]["total_tokens"] == 15
    (req,) = rig.model.requests
    assert req.chat_messages() == [{"role": "system", "content": "Triage."},
                                   {"role": "user", "content": "Subject: refund"}]
    fmt = req.params["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == SCHEMA
    assert fmt["json_schema"]["strict"] is True and fmt["json_schema"]["name"] == "triage"
    assert rig.metric("llm_streams_pipeline_events_total") == 1
    assert rig.metric("llm_streams_pipeline_outputs_total", outcome="ok") == 1


async def test_an_invalid_answer_is_repaired_with_the_errors(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(['{"category": "weather", "urgency": 4}', VALID])
    done = await rig.run([event(0, {"id": "T-2", "subject": "x"})])
    assert done == {0: "ok"}
    first, second = rig.model.requests
    repair = second.chat_messages()[-2:]
    assert repair[0] == {"role": "assistant", "content": '{"category": "weather", "urgency": 4}'}
    assert "$.category: 'weather' is not one of" in repair[1]["content"]
    out = rig.publisher.out[0][2]
    assert out["triage"] == {"category": "bug", "urgency": 4} and out["_llm"]["attempts"] == 2
    assert out["_llm"]["usage"] == {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
    assert rig.metric("llm_streams_pipeline_repairs_total", result="attempted") == 1
    assert rig.metric("llm_streams_pipeline_repairs_total", result="succeeded") == 1
    assert rig.metric("llm_streams_pipeline_validation_failures_total") == 1


async def test_still_invalid_after_repairs_is_an_invalid_output_dead_letter_never_cached(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(["not json at all", '{"category": "bug"}'])
    done = await rig.run([event(3, {"id": "T-3", "subject": "x"})])
    assert done == {3: "dead_letter_invalid_output"}
    ((topic, key, letter),) = rig.publisher.out
    assert topic == "tickets.dlq" and key == b"k3"
    err = letter["error"]
    assert err["type"] == "invalid_output" and err["retryable"] is True
    assert err["details"]["errors"] == ["$: 'urgency' is a required property"]
    assert err["details"]["last_answer"] == '{"category": "bug"}'
    assert letter["attempts"] == 2 and orjson.loads(letter["raw"])["id"] == "T-3"
    assert rig.metric("llm_streams_pipeline_dead_letters_total", type="invalid_output") == 1
    # the same event again is not served the invalid answer: it is asked again
    rig.model.script = [VALID]
    assert await rig.run([event(4, {"id": "T-3b", "subject": "x"})]) == {4: "ok"}
    assert len(rig.model.requests) == 3


async def test_missing_field_is_a_template_dead_letter_and_the_rest_flows(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    done = await rig.run([event(0, {"id": "A", "subject": "s"}),
                          event(1, {"id": "B"}, [("trace", b"t-1")]),
                          event(2, "just text"), event(3, b"\xff\xfe"), event(4, {"id": "C", "subject": "t"})])
    assert done == {0: "ok", 1: "dead_letter_template", 2: "dead_letter_template",
                    3: "dead_letter_validation", 4: "ok"}
    letters = {o[2]["source"]["offset"]: o[2] for o in rig.publisher.out if o[0] == "tickets.dlq"}
    assert letters[1]["error"]["message"] == "prompt.user: missing field 'subject'"
    assert letters[1]["error"]["type"] == "template" and letters[1]["id"] == "B"
    # the event's own headers follow Kafka Connect's, so a replay republishes them
    (hdrs,) = [h for (t, _, v), h in zip(rig.publisher.out, rig.publisher.headers, strict=True)
               if t == "tickets.dlq" and v["source"]["offset"] == 1]
    assert hdrs is not None and hdrs[-1] == ("trace", b"t-1")
    assert hdrs[0][0] == "__connect.errors.topic"
    assert letters[2]["error"]["message"] == "id: missing field 'id'"  # the id renders first
    assert letters[2]["id"] is None  # a text event has no id to render
    assert "neither JSON nor UTF-8" in letters[3]["error"]["message"]


async def test_the_same_event_a_second_time_is_a_cache_hit(rig_factory: Callable[..., Rig]) -> None:
    rig = Rig(settings(pipeline(id=None)), ScriptedModel())
    assert await rig.run([event(0, {"subject": "same"})]) == {0: "ok"}
    assert await rig.run([event(1, {"subject": "same"})]) == {1: "cached"}
    first, second = (o[2] for o in rig.publisher.out)
    assert len(rig.model.requests) == 1
    assert second["_llm"]["cached"] is True and second["_llm"]["endpoint"] is None
    assert second["triage"] == first["triage"] and second["_llm"]["id"] == "tickets-0-1"
    # a redelivery of offset 0 is a replay of its output, not a new answer
    assert await rig.run([event(0, {"subject": "same"})]) == {0: "replayed"}
    assert rig.publisher.out[-1][2] == first and len(rig.model.requests) == 1


def test_a_changed_template_changes_prompt_version_and_cache_key() -> None:
    ev = event(0, {"id": "T", "subject": "same"})
    keys, versions = set(), set()
    for p in (pipeline(), pipeline(prompt={"user": "Ticket: {{ event.subject }}"}),
              pipeline(params={"temperature": 0}),
              pipeline(output={"schema": {**SCHEMA, "required": ["category"]}})):
        rig = Rig(settings(p), ScriptedModel())
        keys.add(cache_key(rig.front.parse(ev), rig.settings.cache.normalize))
        versions.add(rig.front.pipe.prompt_version)
    assert len(keys) == 4 and len(versions) == 4
    same = compile_pipeline(settings(pipeline()), "triage").prompt_version
    assert same == compile_pipeline(settings(pipeline()), "triage").prompt_version


async def test_id_tenant_priority_and_deadline_templates(rig_factory: Callable[..., Rig]) -> None:
    p = pipeline(id="{{ event.id }}-x", tenant="{{ event.account }}",
                 priority="{{ 1 if event.tier == 'gold' else 6 }}", deadline_ms=5_000)
    rig = Rig(settings(p), ScriptedModel())
    gold = rig.front.parse(event(0, {"id": "a", "subject": "s", "account": "acme", "tier": "gold"}))
    assert (gold.id, gold.tenant, gold.priority, gold.deadline) == ("a-x", "acme", 1, 6_000)
    assert rig.front.parse(event(1, {"id": "b", "subject": "s", "account": "", "tier": "x"})
                           ).priority == 6
    bad = Rig(settings(pipeline(priority="{{ event.p }}")), ScriptedModel())
    done = await bad.run([event(2, {"id": "c", "subject": "s", "p": 12})])
    assert done == {2: "dead_letter_template"}
    assert "priority: rendered '12', not an integer 0-9" in bad.publisher.out[0][2]["error"]["message"]


async def test_text_output_and_event_left_out(rig_factory: Callable[..., Rig]) -> None:
    p = pipeline(output={"format": "text", "schema": None, "include_event": False, "field": "answer"})
    rig = Rig(settings(p), ScriptedModel(["plain words"]))
    assert await rig.run([event(0, {"id": "t", "subject": "s"})]) == {0: "ok"}
    out = rig.publisher.out[0][2]
    assert set(out) == {"answer", "_llm"} and out["answer"] == "plain words"
    assert "response_format" not in rig.model.requests[0].params


async def test_a_template_dead_letter_carries_the_rendered_id() -> None:
    rig = Rig(settings(pipeline(id="{{ event.ticket }}")), ScriptedModel())
    assert await rig.run([event(0, {"ticket": "T-9"})]) == {0: "dead_letter_template"}
    letter = rig.publisher.out[0][2]
    assert letter["id"] == "T-9" and letter["error"]["message"].endswith("missing field 'subject'")
