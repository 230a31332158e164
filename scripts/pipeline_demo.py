"""`make demo`'s pipeline part: publish a pipeline's example events, print the enriched ones.

Reads the pipeline from the config, publishes every line of the events file to its source,
waits (from the sink's and dead-letter topic's end offsets taken before publishing) until
each event has an output, and prints a short table.

    python scripts/pipeline_demo.py CONFIG PIPELINE EVENTS.jsonl [--timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from streams.config import load_settings
from streams.pipelines.compiled import find


async def _topics(consumer: AIOKafkaConsumer, topics: list[str],
                  deadline: float) -> list[TopicPartition]:
    """The topics' partitions, once the pipeline's worker has created them all."""
    while True:
        md = await consumer._client.fetch_all_metadata()  # noqa: SLF001 - a demo script
        found = {t: md.partitions_for_topic(t) for t in topics}
        if all(found.values()) or time.monotonic() > deadline:
            return [TopicPartition(t, p) for t, ps in found.items() for p in sorted(ps or ())]
        await asyncio.sleep(0.5)


async def run(config: str, name: str, events: str, timeout: float) -> int:
    settings = load_settings(config)
    cfg = find(settings, name)
    lines = [ln for ln in open(events, "rb").read().splitlines() if ln.strip()]
    boot = settings.kafka.bootstrap_servers
    consumer = AIOKafkaConsumer(bootstrap_servers=boot, enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        tps = await _topics(consumer, [cfg.source, cfg.sink, cfg.dead_letter_topic], deadline)
        tps = [tp for tp in tps if tp.topic != cfg.source]
        consumer.assign(tps)
        for tp, end in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, end)
        producer = AIOKafkaProducer(bootstrap_servers=boot, acks="all")
        await producer.start()
        try:
            for i, line in enumerate(lines):
                await producer.send_and_wait(cfg.source, line, key=f"demo-{i}".encode())
        finally:
            await producer.stop()
        outs: list[tuple[str, dict[str, Any]]] = []
        while len(outs) < len(lines) and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=500)).items():
                outs += [(tp.topic, orjson.loads(m.value)) for m in msgs]
    finally:
        await consumer.stop()
    table = Table(title=f"pipeline {name}: {len(outs)} of {len(lines)} events")
    for col in ("event", "result", "cached", "attempts", "prompt_version"):
        table.add_column(col, overflow="fold")
    field = cfg.output.field
    for topic, doc in outs:
        if topic == cfg.sink:
            llm = doc["_llm"]
            table.add_row(llm["id"], orjson.dumps(doc[field]).decode(), str(llm["cached"]),
                          str(llm["attempts"]), llm["prompt_version"])
        else:
            err = doc["error"]
            table.add_row(doc.get("id") or f"offset {doc['source']['offset']}",
                          f"dead letter {err['type']}: {err['message']}", "-",
                          str(doc.get("attempts")), "-")
    Console().print(table)
    return 0 if len(outs) == len(lines) else 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("pipeline")
    p.add_argument("events")
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args()
    return asyncio.run(run(a.config, a.pipeline, a.events, a.timeout))


if __name__ == "__main__":
    sys.exit(main())
