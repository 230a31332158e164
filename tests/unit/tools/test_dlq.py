"""Selection and decoding of dead letters for `llm-streams dlq` (no broker needed)."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from streams.contract import Source, dead_letter_record
from streams.errors import StreamsError
from streams.tools.cli import build_parser
from streams.tools.dlq import (
    REPLAY_HEADER,
    DeadLetter,
    group,
    original_value,
    parse_since,
    plan_replay,
    replay_summary,
    select,
)

LIMIT = 65_536


def _letter(offset: int = 0, *, kind: str = "exhausted", partition: int = 0,
            key: bytes | None = b"k", headers: tuple[tuple[str, bytes], ...] = (),
            **fields: Any) -> DeadLetter:
    doc: dict[str, Any] = {
        "id": f"r{offset}",
        "error": {"type": kind, "message": f"{kind} failure", "status": 503, "retryable": True},
        "endpoints": ["a", "b"],
        "raw": orjson.dumps({"id": f"r{offset}", "input": "hi"}).decode(),
        "failed_at": "2026-11-21T10:00:00.000Z",
    }
    doc.update(fields)
    return DeadLetter.from_record(partition, offset, key, orjson.dumps(doc), headers)


@pytest.mark.parametrize(("text", "ms"), [
    ("1700000000000", 1_700_000_000_000),
    ("2023-11-14T22:13:20Z", 1_700_000_000_000),
    ("2023-11-14T22:13:20.000+00:00", 1_700_000_000_000),
    ("2023-11-14T23:13:20+01:00", 1_700_000_000_000),
    ("2023-11-14T22:13:20", 1_700_000_000_000),  # naive means UTC
])
def test_parse_since(text: str, ms: int) -> None:
    assert parse_since(text) == ms


def test_parse_since_rejects_garbage_and_the_cli_says_so() -> None:
    with pytest.raises(ValueError):
        parse_since("yesterday")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "replay", "--since", "yesterday"])
    args = build_parser().parse_args(["dlq", "replay", "--since", "2026-11-21T00:00:00Z",
                                      "--error-type", "validation", "--dry-run"])
    assert args.since == parse_since("2026-11-21T00:00:00Z") and args.dry_run
    assert build_parser().parse_args(["dlq", "inspect", "--limit", "3"]).limit == 3


def test_decodes_utf8_and_base64_raw() -> None:
    assert original_value(_letter(), LIMIT) == (b'{"id":"r0","input":"hi"}', None)
    raw = b"\xff\xfe binary"
    letter = _letter(kind="validation", raw=base64.b64encode(raw).decode(), raw_encoding="base64")
    assert original_value(letter, LIMIT) == (raw, None)
    broken = _letter(kind="validation", raw="not base64!", raw_encoding="base64")
    assert original_value(broken, LIMIT) == (None, "raw_unavailable")


def test_truncated_or_missing_raw_is_not_recoverable() -> None:
    assert original_value(_letter(raw=None), LIMIT) == (None, "raw_unavailable")
    assert original_value(_letter(truncated=True), LIMIT) == (None, "truncated")
    long_raw = orjson.dumps({"id": "x", "input": "y" * 200}).decode()
    assert original_value(_letter(raw=long_raw), len(long_raw)) == (None, "truncated")
    assert original_value(_letter(raw=long_raw), len(long_raw) + 10)[0] == long_raw.encode()
    # not JSON although the worker parsed it: cut by a smaller limit than ours
    assert original_value(_letter(raw='{"id": "x", "inp'), LIMIT) == (None, "truncated")
    assert original_value(DeadLetter.from_record(0, 0, None, b"not json"), LIMIT)[1] == "unreadable"


def test_real_dead_letters_round_trip_and_cut_ones_are_detected() -> None:
    value = orjson.dumps({"id": "é" * 40, "input": "x" * 100})
    src = Source("t", 1, 7, 0)
    for limit, expect in ((1000, value), (len(value), None), (len(value) - 1, None)):
        doc, headers = dead_letter_record(
            error=StreamsError("boom"), source=src, value=value, request=None, request_id="x",
            attempts=1, endpoints=[], raw_limit=limit,
        )
        letter = DeadLetter.from_record(1, 7, b"k", doc, headers)
        assert original_value(letter, limit)[0] == expect, limit


def test_select_by_type_and_since() -> None:
    letters = [
        _letter(0, kind="exhausted", failed_at="2026-11-21T10:00:00Z"),
        _letter(1, kind="upstream", failed_at="2026-11-21T11:00:00Z"),
        _letter(2, kind="exhausted", failed_at="2026-11-21T12:00:00.500Z"),
        _letter(3, kind="exhausted", failed_at="garbage"),
    ]
    assert [x.offset for x in select(letters)] == [0, 1, 2, 3]
    assert [x.offset for x in select(letters, "exhausted")] == [0, 2, 3]
    since = parse_since("2026-11-21T11:00:00Z")
    assert [x.offset for x in select(letters, since_ms=since)] == [1, 2]
    assert [x.offset for x in select(letters, "exhausted", since)] == [2]


def test_plan_skips_validation_unless_asked_and_sets_headers() -> None:
    connect = (("__connect.errors.topic", b"req"), ("__connect.errors.offset", b"3"),
               ("trace", b"abc"), (REPLAY_HEADER, b"old/0/0"))
    letters = [
        _letter(5, partition=2, key=b"key-5", headers=connect),
        _letter(6, kind="validation", raw="{broken"),
        _letter(7, truncated=True),
    ]
    plan = plan_replay(letters, "dlq", LIMIT)
    assert plan.selected == 3 and dict(plan.skipped) == {"validation": 1, "truncated": 1}
    [(key, value, headers)] = plan.records
    assert key == b"key-5" and orjson.loads(value) == {"id": "r5", "input": "hi"}
    assert headers == [("trace", b"abc"), (REPLAY_HEADER, b"dlq/2/5")]
    assert replay_summary(plan, 1, False) == (
        "selected 3, replayed 1, skipped 2 (truncated: 1, validation: 1)")

    only = plan_replay(letters, "dlq", LIMIT, error_type="validation")
    assert only.selected == 1 and not only.skipped
    assert only.records[0][1] == b"{broken"
    assert replay_summary(only, 0, True) == "selected 1, would replay 1, skipped 0"


def test_group_by_type_and_last_endpoint() -> None:
    letters = [
        _letter(0), _letter(1), _letter(2, endpoints=["b", "a"]),
        _letter(3, kind="validation", endpoints=[]),
        DeadLetter.from_record(0, 4, None, b"\xff"),
    ]
    rows = [(t, e, n, ex.offset) for t, e, n, ex in group(letters)]
    assert rows == [("exhausted", "b", 2, 0), ("exhausted", "a", 1, 2),
                    ("unreadable", "-", 1, 4), ("validation", "-", 1, 3)]


def test_plan_skips_template_unless_asked_and_replays_invalid_output() -> None:
    letters = [_letter(0, kind="template", raw="plain text event"), _letter(1, kind="invalid_output"),
               _letter(2, kind="validation")]
    plan = plan_replay(letters, "src.dlq", LIMIT)
    assert [v for _, v, _ in plan.records] == [orjson.dumps({"id": "r1", "input": "hi"})]
    assert plan.skipped == {"template": 1, "validation": 1}
    asked = plan_replay(letters, "src.dlq", LIMIT, error_type="template")
    assert [v for _, v, _ in asked.records] == [b"plain text event"] and not asked.skipped


def test_dlq_commands_take_a_pipeline() -> None:
    args = build_parser().parse_args(["dlq", "replay", "--pipeline", "triage",
                                      "--error-type", "invalid_output"])
    assert args.pipeline == "triage" and args.error_type == "invalid_output"
    assert build_parser().parse_args(["dlq", "inspect", "--pipeline", "t"]).pipeline == "t"
