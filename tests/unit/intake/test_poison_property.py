"""Property: valid request JSON with extreme values in every field of the contract, run through
the worker's record path (Runtime -> Processor -> tracker) with fakes, yields exactly one output
per record, and the tracker ends empty with every offset acked in order."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streams.config import load_settings
from streams.contract import Completion, Request
from tests.fakes.fake_faust import events, runtime
from tests.fakes.publisher import FakePublisher
from tests.unit.intake.test_processor import FakeDispatcher

Frag = str  # a JSON text fragment

EDGE_INTS = [0, 1, -1, 5, 9, 10, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
             2**64 - 1, 2**64, 10**30, -(10**30), 946_684_800_000, 4_102_444_800_000,
             1_800_000_000_000, 2_592_000, 2_592_001]
_ints = st.sampled_from(EDGE_INTS) | st.integers() | st.integers(-(2**70), 2**70)
_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [5.0, 0.5, -0.0, 1e308, 1.8e12, float("nan"), float("inf"), float("-inf")])
NANLIKE = ["NaN", "nan", "-nan", "Infinity", "-Infinity", "inf", "1e999", "0x10", "5", " 5",
           "5.0", "", "null", "１２", "٣"]
_odd_text = st.text(st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["\u0000", "\u202e\u200b", "\U0001f600" * 20, "é" * 300, "\ufeff", "\x7f"])


def _num(x: float) -> Frag:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def _str(s: str) -> Frag:
    return orjson.dumps(s).decode()


j_int = _ints.map(str)
j_float = _floats.map(_num)
j_text = _odd_text.map(_str)
j_nanlike = st.sampled_from(NANLIKE).map(_str)
j_huge = st.integers(10_000, 300_000).map(lambda n: _str("x" * n))
j_leaf = st.sampled_from(["null", "true", "false"]) | j_int | j_float | j_text | j_nanlike
j_number_field = j_int | j_float | j_nanlike | st.sampled_from(["null", "true", "[]", "{}"])


def _array(items: list[Frag]) -> Frag:
    return "[" + ",".join(items) + "]"


def _object(items: dict[str, Frag]) -> Frag:
    return "{" + ",".join(f"{_str(k)}:{v}" for k, v in items.items()) + "}"


j_any = st.recursive(j_leaf, lambda inner: st.lists(inner, max_size=4).map(_array)
                     | st.dictionaries(_odd_text, inner, max_size=4).map(_object), max_leaves=12)
# jiter's limit is about 200 levels: either side of it
j_deep = st.tuples(st.integers(150, 260), j_leaf).map(lambda t: "[" * t[0] + t[1] + "]" * t[0])
# one extreme number somewhere in an otherwise plain document
j_poison = st.tuples(st.integers(0, 6), j_int | j_float).map(
    lambda t: "[" * t[0] + '{"n":' + t[1] + "}" + "]" * t[0])
j_meta = j_any | j_deep | j_huge | j_poison


@st.composite
def request_json(draw: st.DrawFn, rid: str) -> bytes:
    fields: dict[str, Frag] = {"id": _str(rid)}
    if draw(st.booleans()):
        fields["input"] = draw(j_text | j_huge)
    else:
        msgs = []
        for _ in range(draw(st.integers(1, 3))):
            msg = {"role": draw(st.sampled_from(['"user"', '"system"', '"assistant"']))}
            msg["content"] = draw(j_text | st.lists(j_any, max_size=3).map(_array) | st.just("null"))
            if draw(st.booleans()):
                msg[draw(st.sampled_from(["name", "x", "tool_call_id"]))] = draw(j_any)
            msgs.append(_object(msg))
        fields["messages"] = _array(msgs)
    # Each field: a legal value or an extreme one (so that records with one odd value and
    # otherwise valid content are common, not only records with many errors).
    optional: dict[str, st.SearchStrategy[Frag]] = {
        "model": st.sampled_from(['"gpt-4o-mini"', '"m"']) | j_text | j_int,
        "params": st.dictionaries(st.sampled_from(["temperature", "max_tokens", "seed", "top_p",
                                                   "stop", "logit_bias", "stream"]),
                                  j_any | j_number_field | j_poison, max_size=3).map(_object),
        "priority": st.integers(0, 9).map(str) | st.sampled_from(['"5"', "5.0"]) | j_number_field,
        "tenant": st.text(max_size=20).map(_str) | j_text | j_int,
        "cache": st.fixed_dictionaries({}, optional={
            "ttl": st.integers(1, 2_592_000).map(str) | j_number_field,
            "no_cache": st.sampled_from(["true", "false"]),
            "no_store": st.sampled_from(["true", "false"])}).map(_object),
        "deadline": st.integers(946_684_800_000, 4_102_444_799_999).map(str) | j_number_field,
        "metadata": j_meta,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        fields[key] = draw(optional[key])
    return ("{" + ",".join(f"{_str(k)}:{v}" for k, v in fields.items()) + "}").encode()


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    n = draw(st.integers(1, 5))
    return [draw(request_json(f"p{i}")) for i in range(n)]


class EncodingDispatcher(FakeDispatcher):
    """Encodes the upstream body as ``UpstreamClient`` does, so what it refuses shows here too."""

    async def dispatch(self, req: Request) -> Completion:
        orjson.dumps({**req.params, "model": req.model, "messages": req.chat_messages()})
        return await super().dispatch(req)


async def _through_the_worker(values: list[bytes], cache: bool) -> None:
    s = load_settings(environ={}, cache={"enabled": cache}, limits={"max_inflight": 4, "max_tracked": 4})
    pub = FakePublisher(max_bytes=4 << 20)
    rt, app = runtime(s, pub, EncodingDispatcher(), cache=cache)
    evs = events(values)
    await rt.submit_batch(evs)
    while rt._tasks:
        await asyncio.gather(*list(rt._tasks))
    keys = sorted(key or b"" for _, key, _ in pub.out)
    assert keys == sorted(f"k{i}".encode() for i in range(len(values))), f"outputs: {keys}"
    event("dead letters" if any(t.endswith(".dlq") for t, _, _ in pub.out) else "all answered")
    assert len(rt._tracker) == 0
    assert [off for _, off in app.consumer.acked] == list(range(len(values)))
    for topic, _, doc in pub.out:
        if topic.endswith(".dlq"):
            assert doc["error"]["type"] == "validation", doc["error"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(batches(), st.booleans())
def test_extreme_values_yield_one_output_each_and_leave_the_tracker_empty(
    values: list[bytes], cache: bool
) -> None:
    asyncio.run(_through_the_worker(values, cache))


def test_a_valid_request_near_every_limit_is_answered() -> None:
    doc: dict[str, Any] = {
        "id": "i" * 256, "input": "\U0001f600" * 1000, "model": "m" * 256, "tenant": "t" * 256,
        "priority": 0, "cache": {"ttl": 2_592_000, "no_store": True},
        "deadline": 4_102_444_799_999, "params": {"seed": 2**63 - 1, "temperature": 1e308},
        "metadata": [[[[-(2**63)]]]],
    }
    s = load_settings(environ={}, cache={"enabled": False})
    pub = FakePublisher()

    async def go() -> None:
        rt, _ = runtime(s, pub, FakeDispatcher(), cache=False)
        await rt.submit_batch(events([orjson.dumps(doc)]))
        while rt._tasks:
            await asyncio.gather(*list(rt._tasks))

    asyncio.run(go())
    assert [t for t, _, _ in pub.out] == ["llm.responses"]
    assert pub.out[0][2]["metadata"] == [[[[-(2**63)]]]]
