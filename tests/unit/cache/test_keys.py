"""Cache key canonicalization: what must and must not change the key."""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from streams.cache.keys import (
    IGNORED_PARAMS,
    cache_key,
    fingerprint,
    idem_key,
    normalize_text,
    tenant_tag,
)
from streams.config import NormalizeConfig
from streams.contract import Request, parse_request

DEFAULT = NormalizeConfig()
RAW = NormalizeConfig(whitespace=False, case_fold=False)
FOLD = NormalizeConfig(whitespace=True, case_fold=True)


def req(**kw: Any) -> Request:
    doc: dict[str, Any] = {"id": "r1", "model": "m", "input": "hello world"}
    doc.update(kw)
    if "messages" in kw:
        doc.pop("input")
    return Request.model_validate(doc)


def key(r: Request, norm: NormalizeConfig = DEFAULT) -> str:
    return cache_key(r, norm)


def test_shape_is_tenant_tag_and_hex_digest_without_payload() -> None:
    k = key(req(input="a very secret prompt", tenant="acme"))
    tag, digest = k.split(":")
    assert tag == tenant_tag("acme") and len(tag) == 16
    assert len(digest) == 32 and set(digest) <= set("0123456789abcdef")
    assert "secret" not in k
    assert key(req()).startswith("_:")


def test_param_order_and_nested_key_order_do_not_matter() -> None:
    a = req(params={"temperature": 0, "response_format": {"type": "json", "strict": True}})
    b = req(params={"response_format": {"strict": True, "type": "json"}, "temperature": 0})
    assert key(a) == key(b)


def test_integral_floats_equal_ints_but_bools_stay_distinct() -> None:
    assert key(req(params={"temperature": 1})) == key(req(params={"temperature": 1.0}))
    assert key(req(params={"logprobs": True})) != key(req(params={"logprobs": 1}))
    assert key(req(params={"temperature": 0.5})) != key(req(params={"temperature": 0.7}))


def test_output_changing_params_change_the_key() -> None:
    base = key(req())
    variants = [
        {"temperature": 0.2}, {"top_p": 0.9}, {"max_tokens": 5}, {"seed": 1},
        {"stop": ["\n"]}, {"n": 2}, {"tools": [{"type": "function"}]},
        {"tool_choice": "auto"}, {"response_format": {"type": "json_object"}},
        {"presence_penalty": 1}, {"logit_bias": {"50256": -100}}, {"some_new_param": 1},
    ]
    keys = {key(req(params=p)) for p in variants}
    assert base not in keys and len(keys) == len(variants)


def test_ignored_params_do_not_change_the_key() -> None:
    base = key(req())
    for name in IGNORED_PARAMS:
        assert key(req(params={name: "x"})) == base, name
    assert key(req(metadata={"trace": 1}, priority=1, id="other", deadline=5)) == base


def test_model_and_tenant_change_the_key() -> None:
    assert key(req(model="a")) != key(req(model="b"))
    a, b = key(req(tenant="acme")), key(req(tenant="globex"))
    assert a != b and a.split(":")[1] != b.split(":")[1]
    assert key(req(tenant="acme")) != key(req())
    assert key(req(tenant="")) == key(req())  # empty tenant is "no tenant"


def test_whitespace_normalization_default_on() -> None:
    assert key(req(input="  hello \n\t world  ")) == key(req(input="hello world"))
    assert key(req(input="  hello   world"), RAW) != key(req(input="hello world"), RAW)


def test_case_fold_is_opt_in() -> None:
    assert key(req(input="Hello World")) != key(req(input="hello world"))
    assert key(req(input="Hello  WORLD"), FOLD) == key(req(input="hello world"), FOLD)
    assert normalize_text("STRASSE", FOLD) == normalize_text("straße", FOLD)


def test_text_parts_of_list_contents_are_normalized() -> None:
    def parts(text: str) -> Request:
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": "u"}}]
        return req(messages=[{"role": "user", "content": content}])

    assert key(parts(" a  b ")) == key(parts("a b"))
    assert key(parts("a b")) != key(parts("a c"))


def test_input_equals_single_user_message() -> None:
    assert key(req(input="hi")) == key(req(messages=[{"role": "user", "content": "hi"}]))


def test_roles_and_message_order_matter() -> None:
    m1 = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    m2 = [{"role": "user", "content": "y"}, {"role": "system", "content": "x"}]
    m3 = [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]
    assert len({key(req(messages=m)) for m in (m1, m2, m3)}) == 3


def test_huge_integers_do_not_crash() -> None:
    assert key(req(params={"seed": 2**70})) != key(req(params={"seed": 2**71}))


def test_idem_key_is_tenant_tag_and_a_fixed_size_hash_of_tenant_and_id() -> None:
    k = idem_key("acme", "x" * 256)
    tag, digest = k.split(":")
    assert tag == tenant_tag("acme") and len(digest) == 32 and "x" not in k
    assert idem_key(None, "a") != idem_key(None, "b")
    assert idem_key(None, "a") == idem_key("", "a") and idem_key(None, "a").startswith("_:")
    assert idem_key("acme", "a").split(":")[1] != idem_key("other", "a").split(":")[1]


json_leaf = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
params_st = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda s: s not in ("model", "messages", "stream")),
    json_value,
    max_size=6,
)


@given(params=params_st, data=st.data())
def test_property_param_order_never_matters(params: dict[str, Any], data: st.DataObject) -> None:
    items = list(params.items())
    shuffled = dict(data.draw(st.permutations(items)))
    assert key(req(params=params)) == key(req(params=shuffled))


@given(words=st.lists(st.text(alphabet="abcXYZ", min_size=1, max_size=5), min_size=1, max_size=6),
       seps=st.lists(st.sampled_from([" ", "  ", "\n", "\t ", "\r\n"]), min_size=6, max_size=6))
def test_property_whitespace_variants_share_a_key(words: list[str], seps: list[str]) -> None:
    spaced = " " + "".join(w + s for w, s in zip(words, seps, strict=False)) + "\n"
    assert key(req(input=spaced)) == key(req(input=" ".join(words)))


@given(a=st.text(max_size=20), b=st.text(max_size=20))
def test_property_distinct_normalized_prompts_get_distinct_keys(a: str, b: str) -> None:
    same = normalize_text(a, DEFAULT) == normalize_text(b, DEFAULT)
    assert (key(req(input=a)) == key(req(input=b))) == same


# -- idempotency fingerprint: stable for the same content, changed by any field ---------

any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)  # what validation accepts
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=3),
    max_leaves=8,
)
message_st = st.fixed_dictionaries(
    {"role": st.text(min_size=1, max_size=8), "content": st.text(max_size=12) | st.none()}
)
FIELDS: dict[str, Any] = {
    "id": st.text(min_size=1, max_size=40),
    "input": st.text(max_size=30),
    "messages": st.lists(message_st, min_size=1, max_size=3),
    "model": st.none() | st.text(min_size=1, max_size=10),
    "params": st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda k: k not in ("model", "messages", "stream")),
        any_json, max_size=4),
    "priority": st.integers(0, 9),
    "tenant": st.none() | st.text(max_size=10),
    "cache": st.fixed_dictionaries({}, optional={
        "ttl": st.none() | st.integers(1, 2_592_000), "no_cache": st.booleans(),
        "no_store": st.booleans()}),
    "deadline": st.none() | st.integers(946_684_800_000, 4_102_444_799_999),
    "metadata": any_json,
}


@st.composite
def request_docs(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(st.sampled_from(["input", "messages"]))
    doc = {"id": draw(FIELDS["id"]), prompt: draw(FIELDS[prompt])}
    for name in ("model", "params", "priority", "tenant", "cache", "deadline", "metadata"):
        if draw(st.booleans()):
            doc[name] = draw(FIELDS[name])
    return doc


def _reordered(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _reordered(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_reordered(v, rnd) for v in value]
    return value


def _fp(raw: bytes, topic: str = "llm.requests") -> bytes:
    return fingerprint(parse_request(raw, max_bytes=1 << 20, default_model="gpt"), topic)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


@given(doc=request_docs(), seed=st.integers(0, 2**32), indent=st.booleans())
def test_property_the_same_content_has_the_same_fingerprint(
    doc: dict[str, Any], seed: int, indent: bool
) -> None:
    again = _reordered(doc, random.Random(seed))
    again["an unknown field"] = [1, 2]  # ignored by the contract, so not content
    raw = json.dumps(doc).encode()
    other = json.dumps(again, indent=2 if indent else None).encode()
    assert _fp(raw) == _fp(other)
    assert len(_fp(raw)) == 16


@given(doc=request_docs(), data=st.data())
def test_property_any_changed_field_changes_the_fingerprint(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(
        [n for n in FIELDS if n not in ("input", "messages")] + ["prompt"]))
    changed = dict(doc)
    if name == "prompt":
        prompt = "input" if "input" in doc else "messages"
        changed[prompt] = data.draw(FIELDS[prompt])
        assume(_canon(changed[prompt]) != _canon(doc[prompt]))
    else:
        changed[name] = data.draw(FIELDS[name])
        before = doc.get(name)
        # a field left out and its default are the same request
        defaults = {"priority": 5, "params": {}, "cache": {}}
        if name in defaults and name not in doc:
            before = defaults[name]
        if name == "cache":
            full = {"ttl": None, "no_cache": False, "no_store": False}
            assume(_canon({**full, **changed[name]}) != _canon({**full, **(before or {})}))
        if name == "model":  # no model is the default model
            before, changed[name] = before or "gpt", changed[name] or "gpt"
        assume(_canon(changed[name]) != _canon(before))
    assert _fp(json.dumps(doc).encode()) != _fp(json.dumps(changed).encode())


@given(doc=request_docs())
def test_property_the_source_topic_is_part_of_the_fingerprint(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    assert _fp(raw, "llm.requests") != _fp(raw, "llm.requests.replay")

def test_a_request_keeps_its_fingerprint_across_the_upgrade() -> None:
    """The print fb024aa (before `kind` and `batch_api`) gave this record: a record remembered
    then is still a redelivery after the upgrade, not answered (and paid) again."""
    from streams.cache.keys import fingerprint
    from streams.contract import parse_request

    value = (b'{"id":"r1","messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini",'
             b'"priority":3,"metadata":{"a":1}}')
    req = parse_request(value, max_bytes=10**6, default_model="gpt-4o-mini", max_ttl=86400)
    assert fingerprint(req, "requests").hex() == "30de7a12b92ccf5763150f5d57a359f3"
    marked = req.model_copy(update={"batch_api": False})
    assert fingerprint(marked, "requests") != fingerprint(req, "requests")
