"""Pipelines with ``output.format: embedding``: config rules, the request, the record, the path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from mockllm.embeddings import vector_base64, vector_for
from mockllm.server import MockBehaviour, MockLLM
from streams.config import Settings, load_settings
from streams.contract import Completion, Request
from streams.embedding import embedding_body, estimate_input_tokens
from streams.errors import ConfigError, InvalidOutput, TemplateFailed
from streams.pipelines.compiled import compile_pipeline
from streams.pipelines.render import render
from streams.tools.cli import main
from tests.unit.pipelines.conftest import Rig, ScriptedModel, event, pipeline, settings

NAME = "docs"


def embed_pipeline(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "name": NAME, "source": "docs", "sink": "docs.out", "model": "text-embedding-3-small",
        "id": "{{ event.id }}", "prompt": {"input": "{{ event.title }}\n{{ event.body }}"},
        "output": {"format": "embedding", "field": "vector"},
    }
    p.update(over)
    return p


def doc(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"D-{i}", "title": f"title {i}", "body": f"body {i}", **kw}


class EmbedModel(ScriptedModel):
    """The mock's vectors (``mockllm.embeddings``) for each input; records each request."""

    async def dispatch(self, req: Request) -> Completion:
        self.requests.append(req)
        text = req.input or ""
        dims = req.params.get("dimensions", 16)
        vec = (vector_base64 if req.params.get("encoding_format") == "base64" else vector_for)
        body = embedding_body(vec(text, dims), dims, estimate_input_tokens(text), 3)
        return Completion(req.model or "m", body, "a", 1, endpoints=["a"])


def rig(**over: Any) -> Rig:
    return Rig(settings(embed_pipeline(**over)), EmbedModel(), name=NAME)


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": {}}, "output.format embedding needs prompt.input"),
    ({"prompt": {"input": "x", "system": "s"}}, "prompt.system not allowed"),
    ({"prompt": {"input": "x", "user": "u"}}, "prompt.user not allowed"),
    ({"prompt": {"input": "x", "few_shot": [{"user": "a", "assistant": "b"}]}},
     "prompt.few_shot not allowed"),
    ({"output": {"format": "embedding", "schema": {"type": "object"}}}, "output.schema not allowed"),
    ({"output": {"format": "embedding", "repair": 2}}, "output.repair not allowed"),
    ({"output": {"format": "embedding", "strict": False}}, "output.strict not allowed"),
    ({"params": {"temperature": 0}}, "params ['temperature'] not allowed"),
    ({"params": {"dimensions": 0}}, "params.dimensions must be an integer"),
    ({"params": {"encoding_format": "hex"}}, "params.encoding_format must be"),
    ({"prompt": {"input": "{{ event.title "}}, "pipeline docs: prompt.input does not compile"),
])
def test_an_embedding_pipeline_that_does_not_fit_is_one_line_naming_it(
        change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_pipeline(settings(embed_pipeline(**change)), NAME)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert f"pipeline {NAME}:" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_prompt_input_is_only_for_embedding_and_chat_needs_user(fmt: str) -> None:
    with pytest.raises(ConfigError, match="pipeline triage: prompt.input is for output.format "
                                          "embedding"):
        settings(pipeline(prompt={"input": "x"}, output={"format": fmt, "schema": None}))
    with pytest.raises(ConfigError, match=f"pipeline triage: prompt.user is required for "
                                          f"output.format {fmt}"):
        settings(pipeline(prompt={"system": "s", "user": None},
                          output={"format": fmt, "schema": None}))


_PROMPT_KEYS = {"system": "s", "user": "u", "few_shot": [{"user": "a", "assistant": "b"}],
                "input": "{{ event.title }}"}
_OUTPUT_KEYS = {"schema": {"type": "object"}, "repair": 2, "strict": False}
_PARAMS = {"dimensions": 8, "encoding_format": "base64", "user": "u", "temperature": 0,
           "max_tokens": 5}


@hyp_settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["text", "json", "embedding"]),
       prompt=st.sets(st.sampled_from(sorted(_PROMPT_KEYS))),
       output=st.sets(st.sampled_from(sorted(_OUTPUT_KEYS))),
       params=st.sets(st.sampled_from(sorted(_PARAMS))))
def test_a_pipeline_is_accepted_exactly_when_its_format_fits(
        fmt: str, prompt: set[str], output: set[str], params: set[str]) -> None:
    p = embed_pipeline(prompt={k: _PROMPT_KEYS[k] for k in prompt},
                       output={"format": fmt, **{k: _OUTPUT_KEYS[k] for k in output}},
                       params={k: _PARAMS[k] for k in params})
    if fmt == "embedding":
        fits = (prompt == {"input"} and not output
                and params <= {"dimensions", "encoding_format", "user"})
    else:
        fits = ("user" in prompt and "input" not in prompt
                and ("schema" not in output or fmt == "json"))
    try:
        compile_pipeline(settings(p), NAME)
    except ConfigError as exc:
        assert not fits, exc
        assert "\n" not in str(exc) and f"pipeline {NAME}:" in str(exc), exc
    else:
        assert fits


def test_the_worker_exits_2_with_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": [embed_pipeline(prompt={"user": "x"})]}))
    assert main(["worker", "--config", str(cfg), "--pipeline", NAME]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pipeline {NAME}: output.format embedding needs" in err


def test_chat_pipelines_keep_their_prompt_version() -> None:
    # The value before prompt.input existed: a chat pipeline's outputs and cache stay as they were.
    assert compile_pipeline(settings(), "triage").prompt_version == "28f2cdefe13a"
    v = compile_pipeline(settings(embed_pipeline()), NAME).prompt_version
    w = compile_pipeline(settings(embed_pipeline(prompt={"input": "{{ event.body }}"})),
                         NAME).prompt_version
    assert v != w


# -- the request and the record -------------------------------------------------------------

def test_an_event_renders_into_an_embedding_request() -> None:
    r = rig(params={"dimensions": 8}, tenant="{{ event.t }}", priority=2)
    req = r.front.parse(event(4, doc(4, t="acme")))
    assert req.kind == "embedding" and req.messages is None
    assert req.input == "title 4\nbody 4" and req.model == "text-embedding-3-small"
    assert req.params == {"dimensions": 8} and req.tenant == "acme" and req.priority == 2
    assert req.id == "D-4"
    # the same request as a native one would be, field by field
    assert Request.model_validate(req.model_dump()) == req


def test_an_empty_or_missing_input_is_a_template_dead_letter() -> None:
    r = rig(prompt={"input": "{{ event.body }}"})
    with pytest.raises(TemplateFailed, match="prompt.input: rendered an empty text") as info:
        r.front.parse(event(0, {"id": "D-0", "body": ""}))
    assert info.value.request_id == "D-0"
    with pytest.raises(TemplateFailed, match="prompt.input: missing field 'body'"):
        r.front.parse(event(1, {"id": "D-1"}))


@pytest.mark.parametrize("params", [{}, {"encoding_format": "base64", "dimensions": 4}])
async def test_the_vector_goes_in_the_field_and_llm_says_how(params: dict[str, Any]) -> None:
    r = rig(params=params)
    done = await r.run([event(0, doc(0, vector="old"))])
    assert done == {0: "ok"}
    [(topic, key, out)] = r.publisher.out
    text, dims = "title 0\nbody 0", params.get("dimensions", 16)
    want = vector_base64(text, dims) if params else vector_for(text)
    assert topic == "docs.out" and key == b"k0"
    assert out["vector"] == want and out["title"] == "title 0"
    llm = out["_llm"]
    assert set(llm) == {"id", "model", "endpoint", "usage", "attempts", "cached", "latency_ms",
                        "prompt_version", "cost", "dimensions", "batch_size", "replaced"}
    assert llm["usage"] == {"prompt_tokens": estimate_input_tokens(text),
                            "total_tokens": estimate_input_tokens(text)}
    assert (llm["dimensions"], llm["batch_size"], llm["attempts"], llm["cached"]) == (
        dims, 3, 1, False)
    assert llm["endpoint"] == "a" and llm["replaced"] == ["vector"] and llm["id"] == "D-0"


async def test_a_second_identical_input_is_a_cache_hit() -> None:
    r = rig()
    await r.run([event(0, doc(0))])
    done = await r.run([event(1, {**doc(0), "id": "D-9"})])
    assert done == {1: "cached"} and len(r.model.requests) == 1
    first, second = (o for _, _, o in r.publisher.out)
    assert second["vector"] == first["vector"] == vector_for("title 0\nbody 0")
    assert second["_llm"]["cached"] is True and second["_llm"]["endpoint"] is None


def test_a_cached_answer_without_a_vector_is_refused() -> None:
    r = rig()
    rec = event(0, doc(0))
    req = r.front.parse(rec)
    comp = Completion("m", {"object": "embedding"}, None, 0, cached=True)
    with pytest.raises(InvalidOutput, match="no vector"):
        r.front.record(rec, req, comp, 1, None)


async def test_render_shows_the_embedding_request() -> None:
    s: Settings = load_settings(environ={}, pipelines=[embed_pipeline(params={"dimensions": 8})])
    text = await render(s, NAME, orjson.dumps(doc(2)), call=False)
    assert "--- input\ntitle 2\nbody 2\n--- request" in text and "--- user" not in text
    body = orjson.loads(text.split("--- request\n", 1)[1])["body"]
    assert body == {"dimensions": 8, "model": "text-embedding-3-small",
                    "input": ["title 2\nbody 2"]}


async def test_render_call_embeds_at_the_endpoint_and_prints_the_record() -> None:
    server = TestServer(MockLLM(MockBehaviour()).app())
    await server.start_server()
    try:
        s = load_settings(environ={}, pipelines=[embed_pipeline(params={"dimensions": 4})],
                          endpoints=[{"name": "ep", "url": f"http://127.0.0.1:{server.port}/v1"}])
        text = await render(s, NAME, orjson.dumps(doc(3)), call=True)
    finally:
        await server.close()
    out = orjson.loads(text.split("--- output\n", 1)[1])
    assert out["vector"] == vector_for("title 3\nbody 3", 4) and out["id"] == "D-3"
    assert out["_llm"]["dimensions"] == 4 and out["_llm"]["endpoint"] == "ep"
    assert out["_llm"]["batch_size"] == 1 and out["_llm"]["usage"]["total_tokens"] >= 1


async def test_llm_cost_is_the_inputs_share_and_a_hit_saves_it() -> None:
    s = load_settings(environ={}, pipelines=[embed_pipeline()],
                      pricing={"text-embedding-3-small": {"input_per_mtok": 0.02,
                                                          "output_per_mtok": 0.0}})
    r = Rig(s, EmbedModel(), name=NAME)
    await r.run([event(0, doc(0))])
    await r.run([event(1, {**doc(0), "id": "D-1"})])
    paid, hit = (o["_llm"]["cost"] for _, _, o in r.publisher.out)
    tokens = estimate_input_tokens("title 0\nbody 0")
    assert paid["total"] == pytest.approx(tokens * 0.02 / 1e6) and paid["saved"] == 0
    assert hit["total"] == 0 and hit["saved"] == pytest.approx(paid["total"])
