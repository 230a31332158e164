"""Operations on the dead-letter topic: inspect it, replay what can be tried again.

Both read the topic without a consumer group (every partition assigned, from the beginning
to the end offsets captured at start), so they never disturb a deployment's offsets.

A replay republishes a dead letter's ORIGINAL request value (its ``raw`` field, base64-decoded
when ``raw_encoding`` is ``base64``) to the requests topic with its original key and the
header ``llm-streams.replay-of: {dlq topic}/{partition}/{offset}``. Dead letters whose raw value
is unavailable or was cut at ``worker.dlq_raw_limit_bytes`` cannot be replayed faithfully and are
skipped, and so are ``validation`` and ``template`` dead letters (replaying them fails again)
unless that type is asked for explicitly; likewise ``budget`` dead letters of requests that could
never fit their tenant's budget (``retryable: false``), while the others, refused by
``on_exhausted: reject``, are replayed (a later window has room). A pipeline's dead letters
(``--pipeline``) are read from its dead-letter topic and republished to its source.

Usage::

    letters = await read_dead_letters(settings, limit=1000)
    print_inspection(console, settings.topics.dead_letter, letters)
    plan = plan_replay(letters, settings.topics.dead_letter, settings.worker.dlq_raw_limit_bytes,
                       error_type="exhausted", since_ms=parse_since("2026-11-21T00:00:00Z"))
    await publish_replay(settings, plan)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.table import Table

from streams.config import Settings
from streams.kafka_io import consumer_options, open_producer, topic_partitions

REPLAY_HEADER = "llm-streams.replay-of"
CONNECT_PREFIX = "__connect.errors."
UNREADABLE = "unreadable"  # error type shown for a dead-letter value that is not a JSON object
# A UTF-8 raw value cut at the limit may lose up to 3 bytes of a split character.
_UTF8_SLACK = 3
# Types a replay would fail again the same way: replayed only when asked for by name. A
# template dead letter's event may be any text (not JSON).
FAIL_AGAIN = frozenset({"validation", "template"})

Header = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    doc: dict[str, Any] | None  # None when the value is not a JSON object
    headers: tuple[Header, ...] = ()

    @classmethod
    def from_record(
        cls, partition: int, offset: int, key: bytes | None, value: bytes | None,
        headers: Iterable[Header] = (),
    ) -> DeadLetter:
        doc: Any = None
        if value is not None:
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError:
                doc = None
        return cls(partition, offset, key, doc if isinstance(doc, dict) else None, tuple(headers))

    @property
    def error(self) -> dict[str, Any]:
        err = (self.doc or {}).get("error")
        return err if isinstance(err, dict) else {}

    @property
    def error_type(self) -> str:
        if self.doc is None:
            return UNREADABLE
        kind = self.error.get("type")
        return kind if isinstance(kind, str) and kind else "unknown"

    @property
    def message(self) -> str:
        msg = self.error.get("message")
        return msg if isinstance(msg, str) else ""

    @property
    def id(self) -> str | None:
        rid = (self.doc or {}).get("id")
        return rid if isinstance(rid, str) else None

    @property
    def endpoint(self) -> str:
        """The last endpoint tried, or "-"."""
        eps = (self.doc or {}).get("endpoints")
        if isinstance(eps, list) and eps and isinstance(eps[-1], str):
            return eps[-1]
        return "-"

    @property
    def failed_at_ms(self) -> int | None:
        text = (self.doc or {}).get("failed_at")
        if not isinstance(text, str):
            return None
        try:
            return parse_since(text)
        except ValueError:
            return None


def parse_since(text: str) -> int:
    """ISO 8601 (naive means UTC) or epoch milliseconds -> epoch milliseconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not ISO 8601 or epoch milliseconds: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def original_value(letter: DeadLetter, raw_limit: int) -> tuple[bytes | None, str | None]:
    """(the original request value, None) or (None, why it cannot be recovered)."""
    doc = letter.doc
    if doc is None:
        return None, UNREADABLE
    if doc.get("truncated"):
        return None, "truncated"
    raw = doc.get("raw")
    if not isinstance(raw, str):
        return None, "raw_unavailable"
    if doc.get("raw_encoding") == "base64":
        try:
            value = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None, "raw_unavailable"
        cut_at = raw_limit
    else:
        value = raw.encode("utf-8")
        cut_at = raw_limit - _UTF8_SLACK
    if raw_limit > 0 and len(value) >= cut_at:
        return None, "truncated"  # the worker cuts raw at the limit: assume it did
    if letter.error_type not in FAIL_AGAIN:
        try:  # the worker parsed it, so the original is JSON; if this is not, it was cut
            orjson.loads(value)
        except orjson.JSONDecodeError:
            return None, "truncated"
    return value, None


def replay_headers(dlq_topic: str, letter: DeadLetter) -> list[Header]:
    """The dead letter's own headers minus Kafka Connect's, plus ``llm-streams.replay-of``."""
    kept = [
        (k, v) for k, v in letter.headers
        if not k.startswith(CONNECT_PREFIX) and k != REPLAY_HEADER
    ]
    kept.append((REPLAY_HEADER, f"{dlq_topic}/{letter.partition}/{letter.offset}".encode()))
    return kept


def select(
    letters: Iterable[DeadLetter], error_type: str | None = None, since_ms: int | None = None
) -> list[DeadLetter]:
    """Dead letters of the given type (any when None) that failed at or after ``since_ms``."""
    out = []
    for letter in letters:
        if error_type is not None and letter.error_type != error_type:
            continue
        if since_ms is not None:
            failed = letter.failed_at_ms
            if failed is None or failed < since_ms:
                continue
        out.append(letter)
    return out


@dataclass
class ReplayPlan:
    selected: int = 0
    records: list[tuple[bytes | None, bytes, list[Header]]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def plan_replay(
    letters: Iterable[DeadLetter],
    dlq_topic: str,
    raw_limit: int,
    *,
    error_type: str | None = None,
    since_ms: int | None = None,
) -> ReplayPlan:
    """What a replay publishes: (key, original value, headers) per replayable dead letter."""
    plan = ReplayPlan()
    for letter in select(letters, error_type, since_ms):
        plan.selected += 1
        if letter.error_type in FAIL_AGAIN and error_type != letter.error_type:
            plan.skipped[letter.error_type] += 1
            continue
        if (letter.error_type == "budget" and letter.error.get("retryable") is False
                and error_type != "budget"):  # its estimate exceeds a whole window: fails again
            plan.skipped["budget_never_fits"] += 1
            continue
        value, reason = original_value(letter, raw_limit)
        if value is None:
            plan.skipped[reason or "raw_unavailable"] += 1
            continue
        plan.records.append((letter.key, value, replay_headers(dlq_topic, letter)))
    return plan


async def read_dead_letters(
    settings: Settings, limit: int | None = None, timeout: float = 120.0
) -> list[DeadLetter]:
    """The dead-letter topic from the beginning to its end offsets at the time of the call."""
    topic = settings.topics.dead_letter
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, group_id=None, auto_offset_reset="earliest",
        max_poll_records=5000,
        **consumer_options(settings),
    )
    await consumer.start()
    out: list[DeadLetter] = []
    try:
        tps = await topic_partitions(settings, topic)
        if not tps:
            return out
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:  # explicit seeks: a lazy seek_to_beginning can race the initial reset
            consumer.seek(tp, starts[tp])
        remaining = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        deadline = time.monotonic() + timeout
        while remaining and (limit is None or len(out) < limit):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took more than {timeout:.0f} s")
            batches = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, msgs in batches.items():
                for m in msgs:
                    if m.offset < ends[tp] and (limit is None or len(out) < limit):
                        out.append(DeadLetter.from_record(
                            tp.partition, m.offset, m.key, m.value, m.headers or ()))
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
                    consumer.pause(tp)
    finally:
        await consumer.stop()
    return out


async def publish_replay(settings: Settings, plan: ReplayPlan) -> int:
    """Publish the plan's records to the requests topic; return how many the broker acked."""
    if not plan.records:
        return 0
    async with open_producer(settings) as producer:
        futures = [
            await producer.send(settings.topics.requests, value=v, key=k, headers=h)
            for k, v, h in plan.records
        ]
        await asyncio.gather(*futures)
    return len(futures)


def group(letters: Sequence[DeadLetter]) -> list[tuple[str, str, int, DeadLetter]]:
    """(error type, endpoint, count, first example) per group, largest first."""
    counts: Counter[tuple[str, str]] = Counter()
    example: dict[tuple[str, str], DeadLetter] = {}
    for letter in letters:
        k = (letter.error_type, letter.endpoint)
        counts[k] += 1
        example.setdefault(k, letter)
    return [(t, e, n, example[(t, e)]) for (t, e), n in
            sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def print_inspection(console: Console, topic: str, letters: Sequence[DeadLetter]) -> None:
    table = Table(title=f"dead letters in {topic}: {len(letters)}")
    table.add_column("error type")
    table.add_column("endpoint")
    table.add_column("count", justify="right")
    table.add_column("example id", overflow="fold")
    table.add_column("example message", overflow="fold")
    for kind, endpoint, n, ex in group(letters):
        msg = ex.message if len(ex.message) <= 160 else ex.message[:157] + "..."
        table.add_row(kind, endpoint, str(n), ex.id or "-", msg)
    console.print(table)


def replay_summary(plan: ReplayPlan, replayed: int, dry_run: bool) -> str:
    """One line: selected, replayed (or would replay), skipped with reasons."""
    done = f"would replay {len(plan.records)}" if dry_run else f"replayed {replayed}"
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(plan.skipped.items()))
    skipped = sum(plan.skipped.values())
    return f"selected {plan.selected}, {done}, skipped {skipped}" + (f" ({reasons})" if reasons else "")
