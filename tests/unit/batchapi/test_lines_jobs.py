"""Batch JSONL lines, job records and parked headers: whatever the provider or topic holds."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.batchapi.jobs import Cut, Part, decode_cut
from streams.batchapi.lines import input_file, read_results
from streams.batchapi.parking import SOURCE_HEADER, read_source, source_header
from streams.contract import Source

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4),
                    max_leaves=12)


def _ok(cid: str, text: str = "hi") -> dict[str, object]:
    return {"custom_id": cid, "error": None, "response": {"status_code": 200, "body": {
        "choices": [{"message": {"role": "assistant", "content": text}}]}}}


def test_input_lines_are_openai_batch_requests() -> None:
    data = input_file([("7", "m", [{"role": "user", "content": "x"}], {"temperature": 0})])
    (line,) = [orjson.loads(x) for x in data.splitlines()]
    assert line == {"custom_id": "7", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"temperature": 0, "model": "m",
                             "messages": [{"role": "user", "content": "x"}]}}


def test_failed_lines_are_failures_and_a_success_wins() -> None:
    rows = [_ok("1"),
            {"custom_id": "2", "response": {"status_code": 500, "body": {"error": {}}}},
            {"custom_id": "3", "error": {"code": "x", "message": "boom"}, "response": None},
            {"custom_id": "4", "response": {"status_code": 200, "body": {"no": "choices"}}},
            {"custom_id": "5", "response": {"status_code": 500}}, _ok("5")]
    got = read_results(b"\n".join(orjson.dumps(r) for r in rows) + b"\nnot json\n[1]\n")
    assert got["1"].ok and got["5"].ok
    assert not got["2"].ok and got["3"].error == "x: boom" and not got["4"].ok
    assert set(got) == {"1", "2", "3", "4", "5"}


@settings(deadline=None)  # a loaded machine: no per-example deadline
@given(st.binary(max_size=2000))
def test_any_output_file_is_read_without_raising(data: bytes) -> None:
    for result in read_results(data).values():
        assert result.ok == (result.error is None)


@settings(deadline=None)  # a loaded machine: no per-example deadline
@given(st.lists(st.dictionaries(st.text(max_size=12), JSON, max_size=5), max_size=8))
def test_any_json_lines_are_read_without_raising(rows: list[dict[str, object]]) -> None:
    got = read_results(b"\n".join(orjson.dumps(r) for r in rows))
    for result in got.values():
        assert result.body is None or isinstance(result.body.get("choices"), list)


def test_a_cut_round_trips_through_its_record() -> None:
    cut = Cut(3, 10, 20, 9, created=5.0, parts=[Part("a", "m", 4, "f", "b", "t", "submitted")])
    assert decode_cut(cut.encode()) == cut


@settings(deadline=None)  # a loaded machine: no per-example deadline
@given(st.binary(max_size=300) | JSON.map(orjson.dumps))
def test_any_job_record_decodes_or_is_skipped(raw: bytes) -> None:
    cut = decode_cut(raw)
    if cut is not None:
        assert cut.start <= cut.end and all(isinstance(p.model, str) for p in cut.parts)


def test_a_job_record_of_wrong_types_is_skipped() -> None:
    good = orjson.loads(Cut(0, 0, 1, 1, parts=[Part("a", "m")]).encode())
    for key, value in (("start", "0"), ("created", "now"), ("done", 1), ("end", -1)):
        assert decode_cut(orjson.dumps({**good, key: value})) is None
    bad_part = {**good, "parts": [{"endpoint": "a", "model": 5}]}
    assert decode_cut(orjson.dumps(bad_part)) is None


@settings(deadline=None)  # a loaded machine: no per-example deadline
@given(st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=60)), max_size=4))
def test_any_headers_give_a_source_or_none(headers: list[tuple[str, bytes]]) -> None:
    got = read_source(headers)
    assert got is None or isinstance(got, Source)


def test_the_source_header_round_trips() -> None:
    src = Source("t", 2, 99, 1_700_000_000_000)
    assert read_source([("x", b"1"), (SOURCE_HEADER, source_header(src))]) == src
    assert read_source([(SOURCE_HEADER, b'["t", "2", 1, 1]')]) is None
