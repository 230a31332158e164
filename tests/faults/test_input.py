"""What the records and the configuration hold: hostile input, and secrets that must never
show up anywhere."""

from __future__ import annotations

import orjson
import pytest

from tests.faults.hostile import MAX_VALUE_BYTES, bad_records, examples, good_request, prompt_of, with_id
from tests.faults.trial import Fleet, Record, Trial, pick, stop_all
from tests.integration.harness import Mock, Stack


@pytest.mark.timeout(pick(300, 900))
async def test_hostile_records_mixed_with_valid_ones(stack: Stack, mocks: list[Mock], fleet: Fleet) -> None:
    n = pick(300, 3000)
    bad = examples(bad_records(), n)
    good = [with_id(doc, f"hostile-{i}") for i, doc in enumerate(examples(good_request(), n))]
    assert len(bad) == len(good) == n
    stack.overrides["limits.max_value_bytes"] = MAX_VALUE_BYTES
    records = []
    for i, (value, doc) in enumerate(zip(bad, good, strict=True)):
        records.append(Record(value, key=None if i % 2 else b"\xff\x00 bad key"))
        records.append(Record(orjson.dumps(doc), f"k{i}".encode(), doc["id"], prompt_of(doc)))
    async with Trial("6 hostile input", stack, mocks) as trial:
        worker = fleet.start()
        await worker.ready()
        await trial.send(records)
        await trial.wait_all(timeout=pick(180, 600))
        for sent in trial.sent.values():
            first = sent.outputs[0]
            if sent.record.id is None:
                assert first.topic == stack.dlq, f"malformed record answered: {sent.record.value[:200]!r}"
                assert first.value["error"]["type"] == "validation", first.value["error"]
            else:
                assert first.topic == stack.responses, f"valid request dead-lettered: {first.value}"
                assert first.value["status"] == "ok"
        assert worker.alive(), "the worker died"
        assert "Traceback" not in worker.log.read_text(errors="replace")
        await stop_all([worker])
        await trial.verdict(f"{n:,} malformed (Hypothesis: bad JSON, deep nesting, huge, wrong types, "
                            f"invalid UTF-8, control characters) + {n:,} valid; 1 worker, never restarted")
