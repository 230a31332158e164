from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.contract import (
    MAX_TOKEN_COUNT,
    USAGE_KEYS,
    Completion,
    Request,
    Source,
    dead_letter_record,
    minimal_dead_letter,
    parse_request,
    peek_id,
    response_record,
    upstream_usage,
)
from streams.errors import UpstreamStatusError, ValidationFailed

LIMIT = 1 << 20


def _req() -> Request:
    return Request(id="r1", input="hi", model="m")


def parse(doc: object) -> object:
    return parse_request(orjson.dumps(doc), max_bytes=LIMIT, default_model="m-default")


def test_minimal_input_request_gets_defaults() -> None:
    req = parse({"id": "a", "input": "hi"})
    assert req.model == "m-default" and req.priority == 5 and req.tenant is None
    assert req.chat_messages() == [{"role": "user", "content": "hi"}]


def test_messages_request_keeps_everything() -> None:
    req = parse({
        "id": "b", "messages": [{"role": "user", "content": "x"}], "model": "gpt",
        "params": {"temperature": 0}, "priority": 0, "tenant": "t", "deadline": 1_800_000_000_000,
        "cache": {"ttl": 9, "no_store": True}, "metadata": {"k": [1, 2]},
    })
    assert req.model == "gpt" and req.params == {"temperature": 0} and req.cache.ttl == 9
    assert req.metadata == {"k": [1, 2]}


@pytest.mark.parametrize(
    "doc",
    [
        {"input": "no id"},
        {"id": "", "input": "empty id"},
        {"id": "x" * 257, "input": "long id"},
        {"id": 5, "input": "int id"},
        {"id": "a"},
        {"id": "a", "input": "x", "messages": [{"role": "user", "content": "y"}]},
        {"id": "a", "messages": []},
        {"id": "a", "messages": "nope"},
        {"id": "a", "messages": [{"content": "no role"}]},
        {"id": "a", "input": "x", "priority": 10},
        {"id": "a", "input": "x", "priority": "high"},
        {"id": "a", "input": "x", "params": {"stream": True}},
        {"id": "a", "input": "x", "cache": {"ttl": 0}},
        {"id": "a", "input": "x", "cache": {"bogus": 1}},
        [1, 2],
        "string",
    ],
)
def test_invalid_requests_are_rejected_with_a_reason(doc: object) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse(doc)
    assert str(info.value)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe\x00garbage", b"", b"{" * 5000 + b"}" * 5000, b'{"id": "a", "input": "\xc3\x28"}'],
)
def test_unparseable_values_are_validation_errors(raw: bytes) -> None:
    with pytest.raises(ValidationFailed):
        parse_request(raw, max_bytes=LIMIT, default_model="m")


def test_oversize_and_tombstone() -> None:
    with pytest.raises(ValidationFailed, match="over the 10 limit"):
        parse_request(b'{"id":"a","input":"xxxxxxxx"}', max_bytes=10, default_model="m")
    with pytest.raises(ValidationFailed, match="tombstone"):
        parse_request(None, max_bytes=10, default_model="m")


def test_peek_id() -> None:
    assert peek_id(b'{"id": "x", "priority": 99}') == "x"
    assert peek_id(b"garbage") is None and peek_id(b'{"id": 3}') is None and peek_id(None) is None


def test_response_record_shape() -> None:
    req = parse({"id": "r", "input": "q", "metadata": {"m": 1}})
    body = {"choices": [{"message": {"content": "ans"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    comp = Completion(model="m-default", body=body, endpoint="ep", attempts=2)
    doc = orjson.loads(response_record(req, comp, latency_ms=12))
    assert doc == {
        "id": "r", "status": "ok", "model": "m-default", "endpoint": "ep", "output": "ans",
        "response": body, "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "cached": False, "attempts": 2, "latency_ms": 12, "metadata": {"m": 1}, "cost": None,
    }
    cached = Completion(model="m", body=body, endpoint="ep", attempts=0, cached=True)
    doc = orjson.loads(response_record(req, cached, latency_ms=1))
    assert doc["endpoint"] is None and doc["cached"] is True


def test_dead_letter_record_shape_and_headers() -> None:
    src = Source("llm.requests", 2, 41, 1700000000000)
    req = parse({"id": "d", "input": "q"})
    err = UpstreamStatusError("HTTP 400: bad", endpoint="ep", status=400)
    value, headers = dead_letter_record(
        error=err, source=src, value=b'{"id":"d","input":"q"}', request=req, request_id="d",
        attempts=1, endpoints=["ep"], raw_limit=1000,
    )
    doc = orjson.loads(value)
    assert doc["id"] == "d"
    assert doc["error"] == {"type": "upstream", "message": "HTTP 400: bad", "status": 400,
                            "retryable": False}
    assert doc["attempts"] == 1 and doc["endpoints"] == ["ep"]
    assert doc["request"]["id"] == "d" and doc["raw"] == '{"id":"d","input":"q"}'
    assert doc["source"] == {"topic": "llm.requests", "partition": 2, "offset": 41,
                             "timestamp": 1700000000000}
    assert doc["failed_at"].endswith("Z") and "raw_encoding" not in doc
    h = dict(headers)
    assert h["__connect.errors.topic"] == b"llm.requests"
    assert h["__connect.errors.partition"] == b"2" and h["__connect.errors.offset"] == b"41"
    assert h["__connect.errors.exception.class.name"] == b"UpstreamStatusError"
    assert h["__connect.errors.exception.message"] == b"HTTP 400: bad"


def test_dead_letter_raw_base64_and_truncation() -> None:
    src = Source("t", 0, 0, 0)
    err = ValidationFailed("bad")
    value, _ = dead_letter_record(error=err, source=src, value=b"\xff\xfeabc", request=None,
                                  request_id=None, attempts=0, endpoints=[], raw_limit=100)
    doc = orjson.loads(value)
    assert doc["raw_encoding"] == "base64" and base64.b64decode(doc["raw"]) == b"\xff\xfeabc"
    assert doc["id"] is None and doc["request"] is None
    value, _ = dead_letter_record(error=err, source=src, value="é".encode() * 10, request=None,
                                  request_id=None, attempts=0, endpoints=[], raw_limit=5)
    doc = orjson.loads(value)
    assert doc["raw"] == "éé" and "raw_encoding" not in doc  # a split character is dropped


# -- values that parse but cannot be written back (issue 12) ---------------------------------

BIG = 2**64 + 1  # beyond int64 and uint64: orjson refuses it


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"id":"a","input":"x","metadata":%d}' % BIG, "metadata"),
        (b'{"id":"a","input":"x","metadata":{"n":[1,%d]}}' % 2**63, "metadata.n[1]"),
        (b'{"id":"a","input":"x","metadata":{"n":%d}}' % -(2**63 + 1), "metadata.n"),
        (b'{"id":"a","input":"x","metadata":NaN}', "metadata"),
        (b'{"id":"a","input":"x","metadata":{"x":[Infinity]}}', "metadata.x[0]"),
        (b'{"id":"a","input":"x","params":{"temperature":1e400}}', "params.temperature"),
        (b'{"id":"a","input":"x","params":{"seed":%d}}' % BIG, "params.seed"),
        (b'{"id":"a","messages":[{"role":"user","content":"x","n":%d}]}' % BIG, "messages[0].n"),
        (b'{"id":"a","messages":[{"role":"user","content":[{"t":-Infinity}]}]}',
         "messages[0].content[0].t"),
        (b'{"id":"a","input":"x","cache":{"ttl":%d}}' % BIG, "cache.ttl"),
        (b'{"id":"a","input":"x","cache":{"ttl":2592001}}', "cache.ttl"),
        (b'{"id":"a","input":"x","deadline":%d}' % BIG, "deadline"),
        (b'{"id":"a","input":"x","deadline":%d}' % 2**63, "deadline"),
        (b'{"id":"a","input":"x","deadline":1700000000}', "deadline"),  # seconds, not ms
        (b'{"id":"a","input":"x","deadline":4102444800000}', "deadline"),
    ],
)
def test_unrepresentable_values_are_validation_errors_naming_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_request(raw, max_bytes=LIMIT, default_model="m")
    assert str(info.value).startswith(f"{field}: "), str(info.value)


def test_edges_of_the_ranges_are_accepted() -> None:
    req = parse({"id": "a", "input": "x", "metadata": [2**63 - 1, -(2**63), 1e308, -0.0],
                 "cache": {"ttl": 2_592_000}, "deadline": 946_684_800_000})
    assert req.cache.ttl == 2_592_000
    orjson.dumps(req.model_dump(mode="json"))  # everything accepted can be written back
    with pytest.raises(ValidationFailed, match="cache.ttl"):
        parse_request(b'{"id":"a","input":"x","cache":{"ttl":61}}', max_bytes=LIMIT,
                      default_model="m", max_ttl=60)


def test_dead_letter_falls_back_to_a_minimal_record_when_the_request_cannot_be_encoded() -> None:
    src = Source("llm.requests", 1, 7, 5)
    raw = b'{"id":"p","input":"x","metadata":%d}' % BIG
    req = Request.model_construct(id="p", input="x", metadata=BIG)  # skips our validation
    err = ValidationFailed("bad \ud800 text")  # a lone surrogate orjson refuses as well
    value, headers = dead_letter_record(error=err, source=src, value=raw, request=req,
                                        request_id="p", attempts=0, endpoints=[], raw_limit=1000)
    doc = orjson.loads(value)
    assert doc["fallback"] is True and doc["id"] == "p" and doc["request"] is None
    assert doc["raw_encoding"] == "base64" and base64.b64decode(doc["raw"]) == raw
    assert doc["error"]["type"] == "validation" and doc["source"]["offset"] == 7
    assert dict(headers)["__connect.errors.exception.message"].startswith(b"bad ")


def test_minimal_dead_letter_of_a_broken_error_still_encodes() -> None:
    class Odd(ValidationFailed):
        status = 2**70

    value = minimal_dead_letter(Odd("x"), Source("t", 0, 0, 0), b"\xff" * 10, "i" * 300, 4)
    doc = orjson.loads(value)
    assert doc["error"]["status"] is None and doc["id"] is None and doc["truncated"] is True


def test_peek_id_reads_records_rejected_for_their_values() -> None:
    assert peek_id(b'{"id": "n", "metadata": NaN}') == "n"
    assert peek_id(b'{"id": "b", "deadline": %d}' % 2**70) == "b"
    assert peek_id(b'{"id": "d", "x": ' + b"[" * 300 + b"]" * 300 + b"}") is None


# What orjson.loads can give for a count (integers beyond 64 bits come back as floats).
_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_COUNT = st.one_of(_INT, st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                   st.text(max_size=5), st.none(), st.lists(_INT, max_size=2))


@given(st.one_of(st.none(), st.dictionaries(st.sampled_from(USAGE_KEYS), _COUNT),
                 _COUNT))
def test_usage_from_upstream_is_counts_or_unknown(usage: object) -> None:
    comp = Completion(model="m", body={"choices": [], "usage": usage}, endpoint="a", attempts=1)
    counts = comp.usage
    assert set(counts) == set(USAGE_KEYS)
    assert all(type(v) is int and 0 <= v <= MAX_TOKEN_COUNT for v in counts.values())
    valid = upstream_usage(comp.body)
    if valid is None:
        assert counts == dict.fromkeys(USAGE_KEYS, 0)
    else:
        assert valid == counts
    orjson.loads(response_record(_req(), comp, latency_ms=1))  # always encodable


def test_bools_negatives_and_fractions_are_not_counts() -> None:
    for usage in ({"prompt_tokens": True}, {"total_tokens": -1}, {"completion_tokens": 1.0},
                  {"total_tokens": 2**53}, {"prompt_tokens": "3"}, [1]):
        assert upstream_usage({"usage": usage}) is None, usage
    assert upstream_usage({"usage": {"total_tokens": 7}}) == {
        "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 7}
    assert upstream_usage({}) is None
