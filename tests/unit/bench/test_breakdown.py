"""bench.breakdown's arithmetic: which library a py-spy frame belongs to, the shares of a raw
profile, and the side-by-side table."""

from __future__ import annotations

import collections

from hypothesis import given
from hypothesis import strategies as st

from bench.breakdown import Sampled, group_of, shares, table


def test_frames_are_grouped_by_the_library_of_their_file() -> None:
    assert group_of("Fetcher._fetcher (faust/transport/drivers/aiokafka.py:714)").startswith("faust")
    assert group_of("send (aiokafka/producer/producer.py:411)").startswith("aiokafka")
    assert group_of("ClientSession._request (aiohttp/client.py:520)").startswith("aiohttp")
    assert group_of("execute (redis/asyncio/client.py:600)").startswith("redis-py")
    assert group_of("run (/usr/lib/python3.11/site-packages/pydantic/main.py:10)").startswith("pydantic")
    assert group_of("Processor._then (streams/intake/processor.py:12)").startswith("llm-streams: intake")
    assert group_of("Admission.acquire (streams/dispatch/admission.py:1)").startswith(
        "llm-streams: dispatch")
    assert group_of("ResponseCache.coalesce (streams/cache/responses.py:2)").startswith(
        "llm-streams: cache")
    assert group_of("response_record (streams/contract_records.py:9)").startswith("llm-streams: other")
    assert group_of("BaseEventLoop._run_once (asyncio/base_events.py:1922)").startswith("asyncio")
    assert group_of("dumps (json/__init__.py:231)") == "json (stdlib)"
    assert group_of("main (bench/bare_pipeline.py:80)").startswith("the floor's own code")
    assert group_of("_find_and_load (<frozen importlib._bootstrap>:1176)") == "imports"
    assert group_of("whatever (somewhere/else.py:3)") == "other (stdlib and the rest)"
    assert group_of("not a frame at all") == "other (stdlib and the rest)"
    # the frame that runs uvloop's loop owns the loop's C time, whoever started it
    assert group_of("Worker.execute_from_commandline (mode/worker.py:279)").startswith("asyncio")
    assert group_of("Worker.stop_and_shutdown (mode/worker.py:300)").startswith("faust")


def test_shares_count_each_sample_by_its_innermost_frame() -> None:
    raw = [
        "<module> (cli.py:1);run (asyncio/runners.py:190);send (aiokafka/producer/producer.py:4) 3",
        "<module> (cli.py:1);Processor._then (streams/intake/processor.py:9) 2",
        "<module> (cli.py:1);Processor._then (streams/intake/processor.py:9);get (redis/client.py:3) 5",
        "",
        "garbage line",
        "trailing count missing;x (y.py:1)",
    ]
    frames: collections.Counter[str] = collections.Counter()
    counts, total = shares(raw, frames)
    assert total == 10
    assert frames["get (redis/client.py)"] == 5 and frames["Processor._then (streams/intake/processor.py)"] == 2
    assert counts["aiokafka (Kafka client)"] == 3
    assert counts["redis-py (Redis client)"] == 5
    assert sum(counts.values()) == total


@given(st.lists(st.text(max_size=80), max_size=30))
def test_shares_never_fail_on_any_text_and_add_up(lines: list[str]) -> None:
    counts, total = shares(lines)
    assert sum(counts.values()) == total >= 0


def test_the_table_scales_shares_by_cpu_per_request_and_takes_medians() -> None:
    worker = [Sampled(200.0, collections.Counter({"a": 50, "b": 50}), 100),
              Sampled(100.0, collections.Counter({"a": 100}), 100),
              Sampled(300.0, collections.Counter({"a": 25, "b": 75}), 100)]
    floor = [Sampled(80.0, collections.Counter({"a": 80}), 80)]
    out = table({"path": (worker, floor)})
    # a: 100, 100, 75 -> median 100; b: 100, 0, 225 -> 100; floor a: 80
    assert "| a | 100.0 | 80.0 | +20.0 |" in out
    assert "| b | 100.0 | 0.0 | +100.0 |" in out
    assert "**200.0** | **80.0** | **+120.0**" in out
    assert out.index("| b |") < out.index("| a |")  # the largest difference first


def test_the_top_frames_of_a_group_are_listed_with_their_share() -> None:
    frames = collections.Counter({"f (streams/intake/processor.py)": 30, "g (redis/client.py)": 70})
    run = Sampled(100.0, collections.Counter({"llm-streams: intake (agent, processor, acks, offsets)": 30,
                                              "redis-py (Redis client)": 70}), 100, frames)
    out = table({"path": ([run], [])})
    assert "- worker, redis-py (Redis client): `g (redis/client.py)` 70.0" in out
    assert "`f (streams/intake/processor.py)` 30.0" in out
