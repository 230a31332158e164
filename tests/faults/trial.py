"""One fault scenario's run: what was produced, what came out, what the upstream saw.

Every scenario ends with the same check (``Trial.verdict``):

- every produced record has at least one output (a response, or a dead letter): lost = 0;
- no output belongs to a record that was never produced;
- duplicates (outputs beyond the first of a record) are counted and reported;
- no upstream call for a request is made after its response was published (each mock's
  call log against the response's LogAppendTime): upstream duplicate calls = 0;
- no committed offset ever passed a record whose output was not yet published: the group's
  committed offsets are sampled twice a second; a record below an offset committed at time T
  must have an output appended by the broker at or before T;
- no partition is stalled: once every record has its output and the workers have stopped, the
  group's committed offset of every partition reaches the partition's end.

The output topics are created with ``message.timestamp.type=LogAppendTime``, so an output's
timestamp is when the broker appended it, on the same clock as the mocks and the sampler.
Records are located by request id (responses) or by their source partition and offset (dead
letters), so a record without a readable id is tracked too.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.intake.finished import Runs, decode
from tests.integration.harness import Collector, Mock, Output, Stack, Worker, start_worker

SIZE = os.environ.get("FAULTS_SIZE", "small")
if SIZE not in ("small", "full"):
    raise RuntimeError(f"FAULTS_SIZE must be small or full, not {SIZE!r}")
SAMPLE_SECONDS = 0.5
APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


def pick(small: Any, full: Any) -> Any:
    """The value for the suite's size (``FAULTS_SIZE``)."""
    return full if SIZE == "full" else small


Pos = tuple[int, int]  # (partition, offset) of a request record


@dataclass(frozen=True, slots=True)
class Record:
    """A record to produce; ``id`` and ``prompt`` are set when it is a valid request."""

    value: bytes
    key: bytes | None = None
    id: str | None = None
    prompt: str | None = None  # what the upstream sees: the request's text


@dataclass(slots=True)
class Row:
    """One line of the README's reliability table."""

    scenario: str
    requests: int
    outputs: int
    lost: int
    duplicates: int
    upstream_duplicates: int
    seconds: float
    notes: str = ""
    size: str = SIZE
    stalled: int = 0  # partitions whose committed offset never reached their end
    # requests the killed workers held in flight (consumed, unanswered), summed over the
    # SIGKILLs; None: no worker was killed. Duplicates beyond it were published before a kill
    # and redone after it.
    in_flight_at_kills: int | None = None


@dataclass(slots=True)
class _Sent:
    record: Record
    outputs: list[Output] = field(default_factory=list)

    def first(self, topic: str | None = None) -> int | None:
        """Append time (ms) of the first output, or of the first on ``topic``."""
        times = [o.timestamp for o in self.outputs if topic is None or o.topic == topic]
        return min(times) if times else None


# An output this close before a SIGKILL came after the dead worker's last commit (the fault
# suite commits every 0.5 s).
KILL_WINDOW_SECONDS = 1.0
ROWS: list[Row] = []  # every verdict of this session, for the summary and the README


class Trial:
    """Produce records, collect outputs, sample commits; ``verdict()`` checks the invariant.

    Usage::

        async with Trial("sigkill", stack, mocks) as trial:
            await trial.send([trial.request(i) for i in range(n)])
            ...  # start workers, inject faults
            await trial.wait_all(timeout=300)
            row = await trial.verdict("12 kills")
    """

    def __init__(self, scenario: str, stack: Stack, mocks: list[Mock], partitions: int = 6) -> None:
        self.scenario = scenario
        self.stack = stack
        self.mocks = mocks
        self.partitions = partitions
        stack.overrides.setdefault("kafka.partitions", partitions)
        self.collector = Collector(stack)
        self.sent: dict[Pos, _Sent] = {}
        self._by_id: dict[str, Pos] = {}
        self._unplaced: list[Output] = []
        self._read = 0
        self.answered = 0  # records with at least one output
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._sampler: asyncio.Task[None] | None = None
        self.started: float | None = None
        self.seconds = 0.0
        self.kills: list[int] = []  # requests in flight in each worker at its SIGKILL
        # the offsets each sample's commits named finished above the committed one
        self.finished: list[tuple[float, dict[int, Runs]]] = []
        self.kill_times: list[float] = []
        self.events: list[tuple[float, str]] = []  # what a scenario did when (FAULTS_DUPS_DIR)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Trial:
        await self._create_topics()
        await self.collector.__aenter__()
        self._sampler = asyncio.create_task(self._sample_commits())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        await self.collector.__aexit__(*exc)

    async def _create_topics(self) -> None:
        s = self.stack
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka)
        await admin.start()
        try:
            await admin.create_topics([
                NewTopic(s.requests, self.partitions, 1),
                NewTopic(s.responses, self.partitions, 1, topic_configs=APPEND_TIME),
                NewTopic(s.dlq, self.partitions, 1, topic_configs=APPEND_TIME),
            ])
        finally:
            await admin.close()

    async def _sample_commits(self) -> None:
        """Committed offsets of the group's requests partitions, twice a second."""
        admin: AIOKafkaAdminClient | None = None
        try:
            while True:
                try:
                    if admin is None:
                        admin = AIOKafkaAdminClient(bootstrap_servers=self.stack.kafka,
                                                    request_timeout_ms=5000)
                        await admin.start()
                    got = await admin.list_consumer_group_offsets(self.stack.group)
                    seen = time.time()
                    mine = {tp.partition: meta for tp, meta in got.items()
                            if tp.topic == self.stack.requests and meta.offset >= 0}
                    self.samples.append((seen, {p: m.offset for p, m in mine.items()}))
                    self.finished.append((seen, {p: decode(m.metadata, m.offset)
                                                 for p, m in mine.items() if m.metadata}))
                except Exception:  # the broker is away or the group is forming: next time
                    if admin is not None:
                        with contextlib.suppress(Exception):
                            await admin.close()
                        admin = None
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            if admin is not None:
                await admin.close()

    # -- producing ---------------------------------------------------------------------------

    def request(self, i: int, keyed: bool = True, **extra: Any) -> Record:
        """A valid request with a prompt no other request of the run has."""
        rid = f"{self.scenario}-{i}"
        prompt = f"{self.scenario} prompt {i}"
        doc = {"id": rid, "input": prompt, **extra}
        return Record(orjson.dumps(doc), f"k{i}".encode() if keyed else None, rid, prompt)

    async def send(self, records: list[Record]) -> None:
        """Produce records (acks=all) and remember where each one landed."""
        if self.started is None:
            self.started = time.monotonic()
        producer = AIOKafkaProducer(bootstrap_servers=self.stack.kafka, acks="all",
                                    enable_idempotence=True, linger_ms=5,
                                    max_request_size=4 * 1024 * 1024)
        await producer.start()
        try:
            futs = [await producer.send(self.stack.requests, value=r.value, key=r.key)
                    for r in records]
            metas = await asyncio.gather(*futs)
        finally:
            await producer.stop()
        for rec, meta in zip(records, metas, strict=True):
            pos = (meta.partition, meta.offset)
            self.sent[pos] = _Sent(rec)
            if rec.id is not None:
                if rec.id in self._by_id:
                    raise ValueError(f"request id {rec.id} produced twice")
                self._by_id[rec.id] = pos

    async def kill(self, worker: Worker) -> int:
        """SIGKILL a worker; returns (and counts for the table) the requests it held in flight."""
        try:
            held = int(await metric(worker, "llm_streams_in_flight"))
        except aiohttp.ClientError:  # /metrics not answering: count it unknown as 0
            held = 0
        worker.kill()
        self.kills.append(held)
        self.kill_times.append(time.time())
        return held

    # -- collecting --------------------------------------------------------------------------

    def _place(self, out: Output) -> Pos | None:
        v = out.value
        if out.topic == self.stack.dlq:
            src = v.get("source") or {}
            if src.get("topic") != self.stack.requests:
                return None
            pos = (src.get("partition"), src.get("offset"))
            return pos if pos in self.sent else None  # type: ignore[return-value]
        rid = v.get("id")
        return self._by_id.get(rid) if isinstance(rid, str) else None

    async def poll(self) -> None:
        await self.collector.poll()
        fresh = self._unplaced + self.collector.outputs[self._read:]
        self._read = len(self.collector.outputs)
        self._unplaced = []
        for out in fresh:
            pos = self._place(out)
            if pos is None:  # not produced yet as far as we know: try again later
                self._unplaced.append(out)
                continue
            sent = self.sent[pos]
            if not sent.outputs:
                self.answered += 1
            sent.outputs.append(out)

    async def wait_answered(self, n: int, timeout: float) -> None:
        """Until at least n records have an output."""
        deadline = time.monotonic() + timeout
        while self.answered < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.scenario}: {self.answered} of {n} records answered "
                                   f"after {timeout:.0f} s; missing e.g. {self.missing()[:5]}")
            await self.poll()

    async def wait_all(self, timeout: float) -> None:
        """Until every produced record has an output; then read on briefly for duplicates."""
        await self.wait_answered(len(self.sent), timeout)
        if self.started is not None:
            self.seconds = time.monotonic() - self.started
        for _ in range(3):
            await self.poll()

    def missing(self) -> list[str]:
        return [s.record.id or f"@{p}:{o}" for (p, o), s in self.sent.items() if not s.outputs]

    def outputs_of(self, topic: str) -> list[Output]:
        return [o for s in self.sent.values() for o in s.outputs if o.topic == topic]

    def duplicate_causes(self) -> tuple[int, int, int]:
        """Of the records output more than once, how many (a) a commit sampled between their
        first and second output named done (committed, or finished above the committed
        offset): redone although the group knew; (b) none did, and the first output came less
        than ``KILL_WINDOW_SECONDS`` before a SIGKILL: published after the dead worker's last
        commit; (c) none did, at another time: finished by a worker after its partition was
        revoked, and redone by the new owner."""
        named = at_kill = other = 0
        kills = sorted(self.kill_times)
        for (part, off), sent in self.sent.items():
            if len(sent.outputs) < 2:
                continue
            t1, t2 = sorted(o.timestamp / 1000 for o in sent.outputs)[:2]
            if (any(t1 < t < t2 and c.get(part, -1) > off for t, c in self.samples)
                    or any(t1 < t < t2 and off in f.get(part, ()) for t, f in self.finished)):
                named += 1
            elif any(0 <= k - t1 < KILL_WINDOW_SECONDS for k in kills):
                at_kill += 1
            else:
                other += 1
        return named, at_kill, other

    # -- the invariant -----------------------------------------------------------------------

    async def upstream_calls(self) -> list[dict[str, Any]]:
        """Every call each mock received (time, status, fault, retry_after, prompt, endpoint)."""
        calls = []
        for i, mock in enumerate(self.mocks):
            for entry in (await mock.stats(log=True))["calls_log"]:
                calls.append({**entry, "endpoint": i})
        return calls

    def _late_calls(self, calls: list[dict[str, Any]]) -> tuple[list[str], int, int]:
        """(calls made after the request's response was published, calls redone, foreign calls).

        Redone: calls beyond the attempts its first output reports (work of a worker that died
        or lost the partition before publishing, done again at least once).
        """
        by_prompt = {s.record.prompt: s for s in self.sent.values() if s.record.prompt}
        per_prompt: Counter[str] = Counter()
        late = []
        foreign = 0
        for call in calls:
            sent = by_prompt.get(call["prompt"])
            if sent is None:
                foreign += 1
                continue
            per_prompt[call["prompt"]] += 1
            answered = sent.first(self.stack.responses)
            if answered is not None and call["t"] * 1000.0 > answered + 1:
                late.append(f"{sent.record.id} called at {call['t']:.3f} on mock {call['endpoint']}, "
                            f"answered at {answered / 1000:.3f}")
        redone = 0
        for prompt, made in per_prompt.items():
            outs = by_prompt[prompt].outputs
            first = min(outs, key=lambda o: o.timestamp) if outs else None
            reported = max(1, first.value.get("attempts") or 0) if first else 0
            redone += max(0, made - reported)
        return late, redone, foreign

    def commit_violations(self) -> list[str]:
        """Records below a committed offset whose output was not yet appended at that time."""
        firsts: dict[int, tuple[list[int], list[float]]] = {}
        for (p, o), sent in sorted(self.sent.items()):
            offsets, worst = firsts.setdefault(p, ([], []))
            first = sent.first()
            t = float("inf") if first is None else float(first)
            offsets.append(o)
            worst.append(max(t, worst[-1]) if worst else t)  # latest first output up to o
        bad = []
        for seen, committed in self.samples:
            for p, c in committed.items():
                if p not in firsts:
                    continue
                offsets, worst = firsts[p]
                i = bisect.bisect_left(offsets, c)  # records at offsets < c
                if i and worst[i - 1] > seen * 1000.0:
                    late = [o for o, s in zip(offsets[:i], worst[:i], strict=True)
                            if s > seen * 1000.0][:3]
                    bad.append(f"partition {p} committed {c} at {seen:.3f} before the output "
                               f"of offset(s) {late}")
        return bad

    def ends(self) -> dict[int, int]:
        """The end offset (last offset + 1) of every partition that received a record."""
        ends: dict[int, int] = {}
        for p, o in self.sent:
            ends[p] = max(ends.get(p, 0), o + 1)
        return ends

    async def stalled(self, timeout: float = 20.0) -> dict[int, tuple[int, int]]:
        """Partitions whose committed offset has not reached their end: {partition: (committed,
        end)}; waits up to ``timeout`` for the sampler to see the last commits."""
        ends = self.ends()
        deadline = time.monotonic() + timeout
        while True:
            committed = self.samples[-1][1] if self.samples else {}
            behind = {p: (committed.get(p, -1), e) for p, e in ends.items()
                      if committed.get(p, -1) < e}
            if not behind or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(SAMPLE_SECONDS)

    async def drain(self) -> None:
        """Read until a second passes without a new output (late duplicates included)."""
        while True:
            before = len(self.collector.outputs)
            for _ in range(3):
                await self.poll()
            if len(self.collector.outputs) == before:
                return

    def _dump_duplicates(self, where: str) -> None:
        """Each record output twice (times, values), the commits sampled and the kills."""
        dups = [{"partition": p, "offset": o,
                 "outputs": [(out.timestamp, out.value) for out in sent.outputs]}
                for (p, o), sent in self.sent.items() if len(sent.outputs) > 1]
        doc = {"dups": dups, "samples": self.samples, "kills": self.kill_times, "events": self.events,
               "finished": [(t, {p: f.runs() for p, f in fs.items()}) for t, fs in self.finished]}
        name = "".join(c if c.isalnum() else "_" for c in self.scenario)
        with open(os.path.join(where, f"{name}.json"), "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))

    async def verdict(self, notes: str = "") -> Row:
        """Check the invariant (asserts), record and return the table row."""
        await self.drain()
        calls = await self.upstream_calls()
        late, redone, foreign_calls = self._late_calls(calls)
        if where := os.environ.get("FAULTS_DUPS_DIR"):  # for a look at each duplicate by hand
            self._dump_duplicates(where)
        outputs = sum(len(s.outputs) for s in self.sent.values())
        lost = len(self.missing())
        duplicates = outputs - self.answered
        violations = self.commit_violations()
        committed = sum(1 for _, c in self.samples if any(c.values()))
        stalled = await self.stalled()
        extra = [f"{redone:,} upstream calls redone for requests unanswered at a crash or "
                 "rebalance (at-least-once)"] if redone else []
        if duplicates:
            named, at_kill, other = self.duplicate_causes()
            extra.append(f"records output twice: {named:,} named done by a commit before the "
                         f"redo, {at_kill:,} first output under {KILL_WINDOW_SECONDS:.0f} s "
                         f"before a kill, {other:,} at other times")
        row = Row(self.scenario, len(self.sent), outputs, lost, duplicates, len(late),
                  round(self.seconds, 1), "; ".join(filter(None, [notes, *extra])),
                  stalled=len(stalled),
                  in_flight_at_kills=sum(self.kills) if self.kills else None)
        ROWS.append(row)
        if late:  # every one, for matching against the workers' logs in the same folder
            (self.stack.tmp / "late-calls.txt").write_text("\n".join(late) + "\n")
        assert lost == 0, f"{lost} records without output, e.g. {self.missing()[:5]}"
        assert not self._unplaced, f"outputs for records never produced: {self._unplaced[:3]}"
        assert not late, (f"{len(late)} upstream calls for requests already answered: {late[:5]} "
                          f"(all in {self.stack.tmp}/late-calls.txt)")
        assert foreign_calls == 0, f"{foreign_calls} upstream calls with unknown prompts"
        assert not violations, f"offsets committed past unpublished outputs: {violations[:5]}"
        assert committed > 0, "the commit sampler never saw a committed offset"
        assert not stalled, f"stalled partitions {{partition: (committed, end)}}: {stalled}"
        return row


async def stop_all(workers: list[Worker]) -> None:
    """SIGTERM every worker still running, at once; each must exit 0 (a clean drain)."""
    running = [w for w in workers if w.alive()]
    codes = await asyncio.gather(*(asyncio.to_thread(w.stop, 90) for w in running))
    assert all(c == 0 for c in codes), f"worker exit codes {codes}"


class Fleet:
    """The worker processes of one scenario."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.all: list[Worker] = []

    def start(self, env: dict[str, str] | None = None, **extra: Any) -> Worker:
        worker = start_worker(self.stack, env, **extra)
        self.all.append(worker)
        return worker

    @property
    def running(self) -> list[Worker]:
        return [w for w in self.all if w.alive()]

    def kill_all(self) -> None:
        for w in self.running:
            w.kill()


async def configure(mocks: list[Mock], **changes: Any) -> None:
    """The same behaviour change on every mock (``POST /config``)."""
    await asyncio.gather(*(m.configure(**changes) for m in mocks))


async def keep_polling(trial: Trial, seconds: float) -> None:
    """Read outputs for ``seconds`` (a fault's duration, or the pause between two)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and trial.answered < len(trial.sent):
        await trial.poll()


async def metric(worker: Worker, name: str) -> float:
    """The sum of a metric's samples on a worker's /metrics (all label sets)."""
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
