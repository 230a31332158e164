"""Cache key canonicalization: what must and must not change the key."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from streams.cachekey import IGNORED_PARAMS, cache_key, id_key, normalize_text, tenant_tag
from streams.config import NormalizeConfig
from streams.contract import Request

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
    assert len(digest) == 32 and int(digest, 16) >= 0
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


def test_id_key_is_a_fixed_size_hash() -> None:
    assert len(id_key("x" * 256)) == 32 and id_key("a") != id_key("b")


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
