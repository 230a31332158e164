"""Pipeline config, templates and schemas: what stops the worker at start, one line, exit 2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streams.config import load_settings
from streams.errors import ConfigError, TemplateFailed
from streams.pipelines.compiled import compile_all, compile_pipeline, pipeline_settings
from streams.pipelines.render import read_event, render
from streams.pipelines.schema import OutputChecker
from streams.pipelines.settings import OutputConfig
from streams.pipelines.templates import Template, compile_template
from streams.tools.cli import main
from tests.unit.pipelines.conftest import SCHEMA, pipeline, settings

ROOT = Path(__file__).resolve().parents[3]


def test_templates_name_the_missing_field_and_refuse_the_sandbox() -> None:
    t = compile_template("prompt.user", "{{ event.a.b }} {{ headers.trace }}", pipeline="p")
    assert t.render({"event": {"a": {"b": 1}}, "headers": {"trace": "x"}}) == "1 x"
    for ctx, field in (({"event": {}, "headers": {}}, "a"), ({"event": {"a": {}}, "headers": {}}, "b"),
                       ({"event": {"a": {"b": 1}}, "headers": {}}, "trace")):
        with pytest.raises(TemplateFailed, match=f"^prompt.user: missing field '{field}'$"):
            t.render(ctx)
    evil = compile_template("prompt.user", "{{ event.__class__.__mro__ }}", pipeline="p")
    with pytest.raises(TemplateFailed, match="sandbox|missing field"):
        evil.render({"event": {}})
    loop = compile_template("id", "{{ 1 // event.n }}", pipeline="p")
    with pytest.raises(TemplateFailed, match="^id: ZeroDivisionError"):
        loop.render({"event": {"n": 0}})
    assert compile_template("id", "plain", pipeline="p").render({}) == "plain"


def test_schema_check_parses_validates_and_lists_errors() -> None:
    checker = OutputChecker.compile(OutputConfig.model_validate({"format": "json", "schema": SCHEMA}),
                                    pipeline="p")
    assert checker.check('```json\n{"category": "bug", "urgency": 1}\n```') == (
        {"category": "bug", "urgency": 1}, [])
    value, errors = checker.check('{"category": "x", "urgency": 9, "more": 1}')
    assert value is None and len(errors) == 3 and all(e.startswith("$") for e in errors)
    assert checker.check("{nope")[1][0].startswith("the answer is not JSON")
    assert checker.check(None)[1] == ["the answer has no text content"]
    assert checker.check('{"category": "x"}', validate=False) == ({"category": "x"}, [])


@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": {"user": "{{ event.subject "}}, "pipeline triage: prompt.user does not compile"),
    ({"prompt": {"system": "{% if %}"}}, "pipeline triage: prompt.system does not compile"),
    ({"id": "{{ }}"}, "pipeline triage: id does not compile"),
    ({"output": {"schema": {"type": "objekt"}}},
     "pipeline triage: output.schema is not valid JSON Schema at type"),
    ({"output": {"schema": "/no/such/schema.json"}},
     "pipeline triage: cannot read output.schema file /no/such/schema.json"),
    ({"output": {"format": "text"}}, "pipeline triage: output.schema needs output.format json"),
])
def test_a_broken_pipeline_is_one_config_error_line(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_all(settings(pipeline(**change)))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"endpoints": ["nope"]}, "pipeline triage: unknown endpoint 'nope'"),
    ({"sink": "tickets"}, "pipeline triage: source, sink and dead_letter must differ"),
    ({"source": "llm.requests"}, "topics.requests (llm.requests)"),
    ({"params": {"response_format": {}}}, "may not set ['response_format']"),
    ({"priority": 10}, "must be 0-9"),
    ({"name": "bad name"}, "must be 1-64 letters"),
    ({"output": {"field": "_llm"}}, "'_llm' is the metadata field"),
    ({"surprise": 1}, "surprise"),
])
def test_config_rules_name_the_pipeline_or_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        settings(pipeline(**change))
    assert message in str(info.value)


def test_two_pipelines_need_two_names() -> None:
    with pytest.raises(ConfigError, match="pipeline names must be unique"):
        settings(pipeline(), pipeline(source="other"))


def test_worker_with_a_broken_template_exits_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": [pipeline(prompt={"user": "{{ oops"})]}))
    for extra in ([], ["--pipeline", "triage"]):
        assert main(["worker", "--config", str(cfg), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("llm-streams: pipeline triage: prompt.user")
    cfg.write_text(yaml.safe_dump({"pipelines": [pipeline()]}))
    assert main(["worker", "--config", str(cfg), "--pipeline", "nope"]) == 2
    assert "unknown pipeline 'nope' (pipelines: triage)" in capsys.readouterr().err


def test_pipeline_settings_take_its_topics_group_and_endpoints() -> None:
    s = load_settings(environ={}, endpoints=[{"name": "a", "url": "http://x/v1"},
                                             {"name": "b", "url": "http://y/v1"}],
                      pipelines=[pipeline(endpoints=["b"])])
    w = pipeline_settings(s, s.pipelines[0])
    assert (w.topics.requests, w.topics.responses, w.topics.dead_letter) == (
        "tickets", "tickets.out", "tickets.dlq")
    assert w.kafka.group_id == "llm-streams.triage" and [e.name for e in w.endpoints] == ["b"]
    assert s.topics.requests == "llm.requests"  # the request workers' own are unchanged


@pytest.mark.parametrize("name", ["support-triage", "review-analysis", "document-embedding"])
async def test_shipped_pipelines_compile_and_render_their_examples(name: str) -> None:
    s = load_settings(ROOT / "config" / "pipelines" / f"{name}.yaml", environ={})
    compile_pipeline(s, name)
    examples = {"support-triage": "support-tickets", "review-analysis": "product-reviews",
                "document-embedding": "documents"}
    path = ROOT / "examples" / f"{examples[name]}.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    assert len(lines) >= 5
    texts = [await render(s, name, ln.encode(), call=False) for ln in lines]
    assert all("--- request" in t for t in texts[:-1])
    assert read_event(f"@{path}") == lines[0].encode()
    if name == "support-triage":  # its last example is missing the subject on purpose
        assert texts[-1].endswith("dead letter template: prompt.user: missing field 'subject'")
    if name == "document-embedding":  # the same: its last document has no title
        assert texts[-1].endswith("dead letter template: prompt.input: missing field 'title'")
        assert "--- input\nResetting your password\n\nOpen Settings" in texts[0]


def _renders_as(fast: Template, slow: Template, ctx: dict[str, Any]) -> None:
    """``fast`` renders ``ctx`` as ``slow`` does, or fails with the same error."""
    try:
        want = slow.render(ctx)
    except TemplateFailed as exc:
        with pytest.raises(TemplateFailed, match=re.escape(str(exc))):
            fast.render(ctx)
    else:
        assert fast.render(ctx) == want


@pytest.mark.parametrize("ctx", [
    {"event": {"a": {"b": "x"}}}, {"event": {"a": {"b": None}}}, {"event": {"a": {"b": 1.5}}},
    {"event": {"a": {"b": [1, "z"]}}}, {"event": {"a": {"b": True}}}, {"event": {"a": "str"}},
    {"event": {"a": {}}}, {"event": "text"}, {"event": {"a": {"b": {"c": 1}}}},
])
def test_a_plain_field_reads_as_jinja_renders_it(ctx: dict[str, Any]) -> None:
    fast = compile_template("id", "{{ event.a.b }}", pipeline="p")
    slow = compile_template("id", "{{ event.a.b }}{# no fast path #}", pipeline="p")
    assert fast._plan == (("", ""), (("a", "b"),)) and slow._plan is None
    _renders_as(fast, slow, ctx)
    assert compile_template("id", "{{ event.items }}", pipeline="p")._plan is None


TEXTS = st.lists(st.sampled_from(["a", " ", "\n", "\r\n", "\r", "}", "{", "%", "#", "é", "\t",
                                  "\x85", "\u2028"]), max_size=12).map("".join)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner,
                                                                 max_size=3),
    max_leaves=6)


@given(texts=st.lists(TEXTS, min_size=2, max_size=4),
       paths=st.lists(st.sampled_from(["a", "b", "a.c", "b.d.e", "x"]), min_size=1, max_size=3),
       event=st.dictionaries(st.sampled_from(["a", "b", "x"]), VALUES, max_size=3))
@hsettings(max_examples=300, deadline=None)
def test_text_and_fields_render_as_jinja_renders_them(
    texts: list[str], paths: list[str], event: dict[str, Any],
) -> None:
    # The plan's literals come from Jinja's own render (its newline handling), its fields are
    # read as Jinja reads them, and anything else (a missing field) is Jinja's to answer.
    source = texts[0] + "".join(f"{{{{ event.{p} }}}}{t}" for p, t in
                                zip(paths, [*texts[1:], *[""] * len(paths)], strict=False))
    try:
        fast = compile_template("prompt.user", source, pipeline="p")
        slow = compile_template("prompt.user", source, pipeline="p")
    except ConfigError:
        return  # the literal text is not a valid template on its own ("{%" ...)
    slow._plan = None  # Jinja's own render
    _renders_as(fast, slow, {"event": event})


def test_the_shipped_prompts_take_the_plan() -> None:
    tpl = compile_template("prompt.user", "Subject: {{ event.subject }}\n\n{{ event.body }}\n",
                           pipeline="p")
    assert tpl._plan == (("Subject: ", "\n\n", ""), (("subject",), ("body",)))
    assert tpl.render({"event": {"subject": "s", "body": 1}}) == "Subject: s\n\n1"
