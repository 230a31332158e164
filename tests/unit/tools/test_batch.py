"""The batch job without a broker: reading requests, matching outputs to lines, the summary."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from streams.config import load_settings
from streams.tools.batch import BatchSummary, _collect, read_requests

DLQ = "llm.requests.dlq"


def test_read_requests_keys_each_line_and_gives_missing_ids_one(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id":"mine","input":"a"}\n\n{"input":"b"}\nnot json\n[1]\n')
    got = read_requests(path, "run1")
    assert [k for k, _ in got] == [b"run1:1", b"run1:3", b"run1:4", b"run1:5"]  # blank skipped
    assert orjson.loads(got[0][1])["id"] == "mine"
    assert orjson.loads(got[1][1]) == {"input": "b", "id": "run1-3"}
    assert got[2][1] == b"not json" and got[3][1] == b"[1]"  # left for the worker to refuse


class _TP:
    def __init__(self, topic: str) -> None:
        self.topic = topic


class _Msg:
    def __init__(self, key: bytes, value: bytes | None) -> None:
        self.key, self.value = key, value


class _Consumer:
    """Hands out the given batches, one per getmany()."""

    def __init__(self, batches: Iterable[dict[Any, list[_Msg]]]) -> None:
        self._batches = list(batches)

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, list[_Msg]]:
        return self._batches.pop(0) if self._batches else {}


async def test_outputs_are_matched_to_lines_and_counted() -> None:
    settings = load_settings(environ={})
    ok, cached = b'{"id":"a","cached":false}', b'{"id":"b","cached":true}'
    letter = orjson.dumps({"id": "c", "error": {"type": "validation"}})
    responses, dlq = _TP(settings.topics.responses), _TP(DLQ)
    consumer = _Consumer([
        {responses: [_Msg(b"r:1", ok), _Msg(b"other:1", ok)]},  # another job's output: ignored
        {responses: [_Msg(b"r:2", cached), _Msg(b"r:1", ok)], dlq: [_Msg(b"r:3", letter)]},
    ])
    summary = BatchSummary(total=4)
    save, errors = io.BytesIO(), io.BytesIO()
    await _collect(consumer, settings, {b"r:1", b"r:2", b"r:3", b"r:4"},  # type: ignore[arg-type]
                   summary, save, errors, timeout=0.2, console=Console(file=io.StringIO()))
    assert save.getvalue() == ok + b"\n" + cached + b"\n"  # the duplicate of r:1 is not saved
    assert errors.getvalue() == letter + b"\n"
    assert (summary.ok, summary.cached, dict(summary.failed), summary.missing) == (
        2, 1, {"validation": 1}, 1)
    assert not summary.succeeded


def test_a_summary_succeeds_only_without_failures_or_missing_answers() -> None:
    assert BatchSummary(total=2, ok=2).succeeded
    assert not BatchSummary(total=2, ok=1, missing=1).succeeded


def test_the_summary_adds_costs_and_savings_and_prints_them(tmp_path: Path) -> None:
    from streams.tools.batch import _print_summary

    s = BatchSummary(total=4, ok=3)
    cost = {"input": 0.0001, "output": 0.0002, "total": 0.0003, "currency": "USD", "saved": 0.0}
    s.add_cost(orjson.dumps({"id": "a", "cost": cost}))
    s.add_cost(orjson.dumps({"id": "b", "cost": {**cost, "total": 0.0, "saved": 0.0003}}))
    s.add_cost(orjson.dumps({"id": "c", "cost": None}))  # a model without a price
    s.add_cost(b"not json")
    s.add_cost(orjson.dumps({"id": "d", "cost": {"total": "1e9", "saved": None}}))  # junk
    assert (s.cost, s.saved, s.currencies) == (0.0003, 0.0003, {"USD"})
    out = io.StringIO()
    _print_summary(Console(file=out, width=120), s, tmp_path / "save", None)
    assert "0.000300 USD" in out.getvalue()
    none = io.StringIO()
    _print_summary(Console(file=none, width=120), BatchSummary(total=1, ok=1), tmp_path, None)
    assert "no price" in none.getvalue()
