"""Hypothesis strategies for hostile input: records that break the contract by construction,
and valid requests with unusual but legal content.

Every bad record is invalid whatever the parser's limits are (a deep nesting is in a place
that must hold a string, or at the top level where an object is required), so the expected
outcome of each is a ``validation`` dead letter. That includes JSON that parses but holds a
value no output could carry (``poison_values``: an integer beyond int64 anywhere, NaN or
Infinity, ``cache.ttl`` or ``deadline`` out of range). ``MAX_VALUE_BYTES`` must be the worker's
``limits.max_value_bytes``; ``MAX_TTL`` its ``cache.max_ttl_seconds`` (the default).
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

MAX_VALUE_BYTES = 64 * 1024
MAX_TTL = 30 * 86_400
DEADLINE_MS = (946_684_800_000, 4_102_444_800_000)  # 2000-01-01 to 2100-01-01, epoch ms

_text = st.text(st.characters(codec="utf-8"), max_size=200)  # any code point UTF-8 can carry
_int = st.integers(-(2**63), 2**63 - 1)  # what JSON encoders agree on
_json_leaf = st.none() | st.booleans() | _int | st.floats(allow_nan=False) | _text
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_text, inner, max_size=4), max_leaves=20)
_base = st.fixed_dictionaries({"id": st.text(min_size=1, max_size=40), "input": _text})
_letters = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10)


def _nest(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# One field replaced by a value of the wrong type or out of range. pydantic's lax mode turns
# "5" and true into ints and 5.0 into 5, so none of those is used as a wrong int.
_WRONG: dict[str, st.SearchStrategy[Any]] = {
    "id": st.none() | _int | st.lists(_text, max_size=2) | st.just("")
    | st.text(min_size=257, max_size=600),
    "input": _int | st.booleans() | st.lists(_text, min_size=1, max_size=3)
    | st.dictionaries(_text, _text, min_size=1, max_size=2),
    "priority": _letters | st.integers(10, 10**6) | st.integers(-(10**6), -1)
    | st.floats(0.1, 8.9).filter(lambda f: not f.is_integer()),
    "messages": _text | st.just([]) | st.lists(st.fixed_dictionaries({"role": _int}),
                                               min_size=1, max_size=2),
    "params": st.lists(_json_leaf, max_size=3) | _text | st.just({"stream": True})
    | st.just({"model": "x"}),
    "cache": st.just({"ttl": 0}) | st.just({"bogus": 1}) | _text
    | st.fixed_dictionaries({"ttl": _letters}),
    "deadline": st.integers(-(2**63), -1) | _letters,
    "model": st.just("") | _int,
    "tenant": _int | st.text(min_size=257, max_size=400),
}


@st.composite
def wrong_type(draw: st.DrawFn) -> bytes:
    doc = dict(draw(_base))
    field = draw(st.sampled_from(sorted(_WRONG)))
    doc[field] = draw(_WRONG[field])
    if field == "messages":  # exactly one of input / messages
        doc.pop("input")
    return orjson.dumps(doc)


@st.composite
def bad_json(draw: st.DrawFn) -> bytes:
    """A strict prefix of a valid request (an object never closed), or text that is no JSON."""
    whole = orjson.dumps(draw(_base))
    if draw(st.booleans()):
        return whole[: draw(st.integers(0, len(whole) - 1))]
    return draw(st.text(min_size=1, max_size=80).filter(_not_json)).encode()


def _not_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return True
    return False


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(64, 20_000))
    where = draw(st.sampled_from(["top", "input", "messages", "object"]))
    if where == "top":
        return _nest(depth)
    if where == "object":  # {"a": {"a": ...}}: no id, no prompt
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"id":"deep","' + where.encode() + b'":' + _nest(depth, b"1") + b"}"


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):  # over limits.max_value_bytes
        size = draw(st.integers(MAX_VALUE_BYTES, 4 * MAX_VALUE_BYTES))
        return orjson.dumps({"id": "huge", "input": "x" * size})
    return orjson.dumps({"id": "y" * draw(st.integers(257, 20_000)), "input": "too long an id"})


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    """A request whose prompt holds bytes that are no UTF-8 (a lone continuation, a bad lead)."""
    junk = draw(st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xed\xa0\x80",
                                 b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]))
    head = orjson.dumps(draw(_text))[1:-1]
    return b'{"id":"utf8","input":"' + head + junk + b'"}'


@st.composite
def control_chars(draw: st.DrawFn) -> bytes:
    """A raw (unescaped) control character inside a string, or between tokens."""
    ch = draw(st.integers(0, 0x1F))
    if ch in (9, 10, 13) or draw(st.booleans()):  # tab, LF, CR are JSON white space outside strings
        return b'{"id":"ctl","input":"a' + bytes([ch]) + b'b"}'
    return b'{"id":"ctl",' + bytes([ch]) + b'"input":"ab"}'


_beyond_int64 = st.integers(2**63, 2**80) | st.integers(-(2**80), -(2**63) - 1)
_non_finite = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
_poison_number = _beyond_int64.map(lambda i: str(i).encode()) | _non_finite


@st.composite
def poison_values(draw: st.DrawFn) -> bytes:
    """Valid JSON, otherwise a valid request, with one value that cannot be written back."""
    where = draw(st.sampled_from(["metadata", "nested", "params", "message", "content", "ttl",
                                  "deadline"]))
    head = b'{"id":"poison","input":' + orjson.dumps(draw(_text))
    if where == "ttl":
        ttl = draw(_beyond_int64 | st.integers(MAX_TTL + 1, 2**63 - 1))
        return head + b',"cache":{"ttl":%d}}' % ttl
    if where == "deadline":
        out_of_range = st.integers(1, DEADLINE_MS[0] - 1) | st.integers(DEADLINE_MS[1], 2**63 - 1)
        return head + b',"deadline":%d}' % draw(_beyond_int64 | out_of_range)
    number = draw(_poison_number)
    if where == "metadata":
        return head + b',"metadata":' + number + b"}"
    if where == "nested":
        depth = draw(st.integers(1, 60))
        return head + b',"metadata":' + b'[{"a":' * depth + number + b"}]" * depth + b"}"
    if where == "params":
        return head + b',"params":{"seed":' + number + b"}}"
    msg = b'{"role":"user","content":"x","n":' + number + b"}"
    if where == "content":
        msg = b'{"role":"user","content":[{"type":"text","text":"x","n":' + number + b"}]}"
    return b'{"id":"poison","messages":[' + msg + b"]}"


def bad_records() -> st.SearchStrategy[bytes]:
    return st.one_of(bad_json(), deep_nesting(), huge(), wrong_type(), invalid_utf8(),
                     control_chars(), poison_values())


@st.composite
def good_request(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request (the caller adds a unique ``id`` and puts it at the prompt's start)."""
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["input"] = draw(_text)
    else:
        doc["messages"] = [{"role": draw(st.sampled_from(["system", "user", "assistant"])),
                            "content": draw(_text)} for _ in range(draw(st.integers(1, 3)))]
    optional: dict[str, st.SearchStrategy[Any]] = {
        "priority": st.integers(0, 9),
        "tenant": st.text(max_size=50),
        "metadata": _json,
        "params": st.fixed_dictionaries({"temperature": st.floats(0, 2), "max_tokens": st.integers(1, 4096)}),
        "cache": st.fixed_dictionaries({"no_store": st.booleans()},
                                       optional={"ttl": st.integers(1, MAX_TTL)}),
        "deadline": st.integers(4_000_000_000_000, DEADLINE_MS[1] - 1),  # 2096: never expires
        "edges": st.just([2**63 - 1, -(2**63), 1.7976931348623157e308, -0.0, "", "\u0000"]),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        if key == "edges":  # legal extremes, carried back in the response's metadata
            doc["metadata"] = draw(optional[key])
        else:
            doc[key] = draw(optional[key])
    return doc


def examples(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """n values drawn by Hypothesis (derandomized: the same list on every run)."""
    out: list[Any] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out[:n]


def prompt_of(doc: dict[str, Any]) -> str:
    """What the mock sees as the prompt of a valid request (its ``_prompt_text``)."""
    if "input" in doc:
        return str(doc["input"])
    return "\n".join(m["content"] for m in doc["messages"])


def with_id(doc: dict[str, Any], rid: str) -> dict[str, Any]:
    """The request with its id, and the id at the start of its prompt (prompts stay unique)."""
    doc = {**doc, "id": rid}
    if "input" in doc:
        doc["input"] = f"{rid} {doc['input']}"
    else:
        first, *rest = doc["messages"]
        doc["messages"] = [{**first, "content": f"{rid} {first['content']}"}, *rest]
    return doc
