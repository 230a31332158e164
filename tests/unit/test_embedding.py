"""Embedding requests: validation, the response record, cache keys, and reading upstream vectors."""

from __future__ import annotations

import base64
from array import array
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mockllm.embeddings import embeddings_body, vector_base64, vector_for
from streams.cache.keys import cache_key, fingerprint
from streams.config import NormalizeConfig
from streams.contract import Completion, Request, parse_request, response_record
from streams.dispatch.vectors import read_vectors, split_usage
from streams.embedding import embedding_body
from streams.errors import UpstreamBadResponse, ValidationFailed


def _parse(doc: dict[str, Any]) -> Request:
    return parse_request(orjson.dumps(doc), max_bytes=1 << 20, default_model="emb")


def _emb(**kw: Any) -> dict[str, Any]:
    return {"id": "1", "kind": "embedding", "input": "hello", **kw}


@pytest.mark.parametrize("doc, why", [
    (_emb(input=None, messages=[{"role": "user", "content": "x"}]), "not 'messages'"),
    (_emb(input=""), "non-empty 'input'"),
    (_emb(params={"temperature": 1}), "not allowed for an embedding"),
    (_emb(params={"dimensions": 0}), "params.dimensions"),
    (_emb(params={"dimensions": True}), "params.dimensions"),
    (_emb(params={"encoding_format": "int8"}), "encoding_format"),
    (_emb(params={"user": 5}), "params.user"),
    (_emb(kind="image"), "kind"),
])
def test_invalid_embedding_requests_are_validation_errors(doc: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationFailed, match=why):
        _parse(doc)


def test_a_chat_request_is_unchanged_by_kind() -> None:
    req = _parse({"id": "1", "input": "hi"})
    assert req.kind == "chat"
    # A chat request's fingerprint does not depend on the new field (stored records stay valid).
    assert fingerprint(req, "t") == fingerprint(req.model_copy(update={"kind": "chat"}), "t")


def test_the_response_record_of_an_embedding() -> None:
    req = _parse(_emb(metadata={"doc": 7}))
    comp = Completion(model="emb", body=embedding_body(vector_for("hello"), 16, 2, 37),
                      endpoint="a", attempts=1, endpoints=["a"])
    doc = orjson.loads(response_record(req, comp, latency_ms=12))
    assert doc == {"id": "1", "status": "ok", "kind": "embedding", "model": "emb",
                   "endpoint": "a", "output": None, "embedding": vector_for("hello"),
                   "dimensions": 16, "usage": {"prompt_tokens": 2, "total_tokens": 2},
                   "cached": False, "attempts": 1, "batch_size": 37, "latency_ms": 12,
                   "metadata": {"doc": 7}, "cost": None}
    priced = {"input": 4e-08, "output": 0.0, "total": 4e-08, "currency": "USD", "saved": 0.0}
    assert orjson.loads(response_record(req, comp, latency_ms=12, cost=priced))["cost"] == priced
    hit = Completion(model="emb", body=comp.body, endpoint=None, attempts=0, cached=True)
    doc = orjson.loads(response_record(req, hit, latency_ms=1))
    assert doc["cached"] is True and doc["endpoint"] is None and doc["attempts"] == 0


def test_cache_keys_of_embeddings() -> None:
    norm = NormalizeConfig()
    base = _parse(_emb())

    def key(**kw: Any) -> str:
        return cache_key(_parse(_emb(**kw)), norm)

    assert key() == cache_key(base, norm)
    assert key(params={"user": "u1"}) == key()  # user changes no vector
    assert key(params={"encoding_format": "float"}) == key()
    different = [key(model="other"), key(tenant="t1"), key(params={"dimensions": 8}),
                 key(params={"encoding_format": "base64"}), key(input="hello "),
                 cache_key(_parse({"id": "1", "input": "hello"}), norm)]
    assert len({key(), *different}) == len(different) + 1
    assert key(tenant="t1").split(":")[0] != key(tenant="t2").split(":")[0]


def test_read_vectors_matches_by_index() -> None:
    body = embeddings_body("m", ["a", "b", "c"], 4, "float")
    body["data"].reverse()
    got = read_vectors(body, 3, endpoint="x", status=200)
    assert got == [(vector_for("a", 4), 4), (vector_for("b", 4), 4), (vector_for("c", 4), 4)]
    b64 = embeddings_body("m", ["a"], 4, "base64")
    assert read_vectors(b64, 1, endpoint="x", status=200) == [(vector_base64("a", 4), 4)]


@pytest.mark.parametrize("body", [
    None, [], {}, {"data": {}}, {"data": []},
    {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]},
    {"data": [{"index": 0, "embedding": [1.0]}, {"index": 2, "embedding": [1.0]}]},
    {"data": [{"index": True, "embedding": [1.0]}, {"index": 1, "embedding": [1.0]}]},
    {"data": [{"index": 0, "embedding": ["x"]}, {"index": 1, "embedding": [1.0]}]},
    {"data": [{"index": 0, "embedding": []}, {"index": 1, "embedding": [1.0]}]},
    {"data": [{"index": 0, "embedding": [1e308, 1e308]}, {"index": 1, "embedding": [1.0]}]},
    {"data": [{"index": 0, "embedding": "not base64!"}, {"index": 1, "embedding": [1.0]}]},
    {"data": [{"index": 0, "embedding": "AAA="}, {"index": 1, "embedding": [1.0]}]},
])
def test_bad_embedding_answers_are_bad_responses(body: Any) -> None:
    with pytest.raises(UpstreamBadResponse):
        read_vectors(body, 2, endpoint="x", status=200)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)
_item = st.fixed_dictionaries({"index": st.integers(-1, 3) | st.booleans() | st.none(),
                               "embedding": _json | st.lists(st.floats(), max_size=4)})


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.fixed_dictionaries({"data": st.lists(_item, max_size=4)})),
       st.integers(1, 3))
def test_property_any_answer_reads_or_is_a_bad_response(body: Any, n: int) -> None:
    try:
        got = read_vectors(body, n, endpoint="x", status=200)
    except UpstreamBadResponse:
        return
    assert len(got) == n
    for vector, dims in got:
        if isinstance(vector, str):
            assert len(base64.b64decode(vector)) == 4 * dims
        else:
            assert len(vector) == dims and all(isinstance(x, float) for x in vector)
            orjson.dumps(vector)  # writable back


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**9) | st.none(), st.lists(st.integers(0, 10_000), min_size=1,
                                                   max_size=300))
def test_property_usage_shares_add_up(total: int | None, weights: list[int]) -> None:
    shares = split_usage(total, weights)
    assert len(shares) == len(weights) and all(s >= 0 for s in shares)
    assert sum(shares) == (total or 0)
    if total and sum(weights):
        for s, w in zip(shares, weights, strict=True):
            assert abs(s - total * w / sum(weights)) < 1 + 1e-9


def test_base64_vector_is_the_float_vector() -> None:
    raw = base64.b64decode(vector_base64("x", 8))
    floats = array("f")
    floats.frombytes(raw)
    assert floats.tolist() == vector_for("x", 8)


_params = st.dictionaries(
    st.sampled_from(["dimensions", "encoding_format", "user", "temperature", "model"]),
    st.none() | st.booleans() | st.integers(-5, 70_000) | st.text(max_size=6)
    | st.sampled_from(["float", "base64"]),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"id": st.text(min_size=1, max_size=5), "kind": st.just("embedding")},
                             optional={"input": st.none() | st.text(max_size=20),
                                       "messages": st.just([{"role": "user", "content": "x"}]),
                                       "params": _params, "tenant": st.text(max_size=4)}))
def test_property_embedding_requests_parse_or_are_validation_errors(doc: dict[str, Any]) -> None:
    try:
        req = _parse(doc)
    except ValidationFailed:
        return
    assert req.kind == "embedding" and req.input and req.messages is None
    assert set(req.params) <= {"dimensions", "encoding_format", "user"}
    assert cache_key(req, NormalizeConfig())
    comp = Completion(model="emb", body=embedding_body([0.5], 1, 1, 1), endpoint="a", attempts=1)
    assert orjson.loads(response_record(req, comp, latency_ms=0))["kind"] == "embedding"
