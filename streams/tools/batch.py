"""The batch job of a plain parallel requester, on top of Kafka.

Publishes every line of a JSONL file to the requests topic, waits until each has a response
or a dead letter, writes them to SAVE and ERRORS, and shows progress and a summary. Records
are keyed ``{run}:{line}`` so every output (which keeps its request's key) is matched to its
line, even for a line that is not valid JSON. A running worker answers them.

Usage::

    summary = await run_batch(settings, Path("requests.jsonl"), Path("out.jsonl"), None)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streams.config import Settings
from streams.kafka_io import consumer_options, ensure_topics, open_producer


@dataclass
class BatchSummary:
    total: int = 0
    ok: int = 0
    cached: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    missing: int = 0
    seconds: float = 0.0
    cost: float = 0.0  # paid, summed over the answers' ``cost.total``
    saved: float = 0.0  # ``cost.saved`` of cache hits and coalesced answers
    currencies: set[str] = field(default_factory=set)  # empty: no answer had a price

    def add_cost(self, value: bytes) -> None:
        """Add a response record's ``cost`` (null when its model has no price)."""
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        cost = doc.get("cost") if isinstance(doc, dict) else None
        if not isinstance(cost, dict):
            return
        total, saved, currency = cost.get("total"), cost.get("saved"), cost.get("currency")
        self.cost += total if isinstance(total, (int, float)) else 0.0
        self.saved += saved if isinstance(saved, (int, float)) else 0.0
        if isinstance(currency, str):
            self.currencies.add(currency[:8])

    @property
    def succeeded(self) -> bool:
        return not self.failed and not self.missing


def _prepare(line: bytes, run: str, lineno: int) -> bytes:
    """Give a request without an id a generated one; leave anything else as it is."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line  # the worker turns it into a validation dead letter
    if isinstance(doc, dict) and "id" not in doc:
        doc["id"] = f"{run}-{lineno}"
        return orjson.dumps(doc)
    return line


def read_requests(path: Path, run: str) -> list[tuple[bytes, bytes]]:
    """(key, value) per non-blank line."""
    out = []
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if line:
                out.append((f"{run}:{lineno}".encode(), _prepare(line, run, lineno)))
    return out


async def _end_offsets(
    consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, topics: list[str]
) -> None:
    tps: list[TopicPartition] = []
    for topic in topics:
        parts = await producer.partitions_for(topic)  # fetches the topic's metadata
        tps.extend(TopicPartition(topic, p) for p in sorted(parts))
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:  # resolve the lazy seek now, before anything is published
        await consumer.position(tp)


async def run_batch(
    settings: Settings,
    requests_path: Path,
    save_path: Path,
    errors_path: Path | None,
    *,
    timeout: float = 3600.0,
    console: Console | None = None,
) -> BatchSummary:
    console = console or Console(stderr=True)
    run = uuid.uuid4().hex[:12]
    records = read_requests(requests_path, run)
    summary = BatchSummary(total=len(records))
    await ensure_topics(settings)
    t = settings.topics
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, max_poll_records=5000, **consumer_options(settings)
    )
    await consumer.start()
    started = time.monotonic()
    try:
        async with open_producer(settings) as producer:
            await _end_offsets(consumer, producer, [t.responses, t.dead_letter])
            futures = [await producer.send(t.requests, value=v, key=k) for k, v in records]
            await asyncio.gather(*futures)
        with save_path.open("wb") as save, _open_errors(errors_path) as errors:
            await _collect(consumer, settings, {k for k, _ in records}, summary, save, errors,
                           timeout, console)
    finally:
        await consumer.stop()
    summary.seconds = time.monotonic() - started
    _print_summary(console, summary, save_path, errors_path)
    return summary


class _NullIO:
    def write(self, _: bytes) -> int:
        return 0

    def __enter__(self) -> _NullIO:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _open_errors(path: Path | None) -> IO[bytes] | _NullIO:
    return path.open("wb") if path is not None else _NullIO()


async def _collect(
    consumer: AIOKafkaConsumer,
    settings: Settings,
    waiting: set[bytes],
    summary: BatchSummary,
    save: IO[bytes],
    errors: IO[bytes] | _NullIO,
    timeout: float,
    console: Console,
) -> None:
    dlq = settings.topics.dead_letter
    deadline = time.monotonic() + timeout
    last_progress = time.monotonic()
    warned = False
    columns = (TextColumn("answers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("answers", total=len(waiting))
        while waiting and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, msgs in batches.items():
                for msg in msgs:
                    if msg.key not in waiting or msg.value is None:
                        continue  # another job's output, or a duplicate (at-least-once)
                    waiting.discard(msg.key)
                    last_progress = time.monotonic()
                    if tp.topic == dlq:
                        errors.write(msg.value + b"\n")
                        doc = orjson.loads(msg.value)
                        summary.failed[str(doc.get("error", {}).get("type", "unknown"))] += 1
                    else:
                        save.write(msg.value + b"\n")
                        summary.ok += 1
                        summary.cached += b'"cached":true' in msg.value
                        summary.add_cost(msg.value)
                    progress.advance(bar)
            if not warned and time.monotonic() - last_progress > 30:
                warned = True
                console.print("[yellow]no answer for 30 s: is a worker running? "
                              "(llm-streams worker --config ...)[/yellow]")
    summary.missing = len(waiting)


def _print_summary(
    console: Console, s: BatchSummary, save: Path, errors: Path | None
) -> None:
    table = Table(title="llm-streams batch", show_header=False)
    table.add_row("requests", str(s.total))
    table.add_row("answered", f"{s.ok} ({s.cached} from cache)")
    table.add_row("dead letters", str(sum(s.failed.values())))
    for kind, n in sorted(s.failed.items()):
        table.add_row(f"  {kind}", str(n))
    if s.currencies:
        cur = "/".join(sorted(s.currencies))
        table.add_row("cost", f"{s.cost:.6f} {cur}")
        table.add_row("saved (cache, coalescing)", f"{s.saved:.6f} {cur}")
    else:
        table.add_row("cost", "- (no price for these models: pricing:)")
    if s.missing:
        table.add_row("unanswered (timed out)", str(s.missing))
    rate = s.total / s.seconds if s.seconds else 0.0
    table.add_row("time", f"{s.seconds:.1f} s ({rate:.0f} req/s)")
    table.add_row("responses in", str(save))
    if errors is not None:
        table.add_row("errors in", str(errors))
    console.print(table)
