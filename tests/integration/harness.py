"""Processes and clients for integration tests: mock endpoints, workers, a producer, a collector.

Every test gets its own topics and consumer group, so tests never see each other's records.
The producer and collector are plain aiokafka clients, independent of the worker's code.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.integration.servers import Sasl, free_port

ROOT = Path(__file__).resolve().parents[2]
KAFKA = os.environ.get("TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "15"))
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
PY = sys.executable


async def wait_http(url: str, timeout: float = 30.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s")


@dataclass
class Mock:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stats(self, log: bool = False) -> dict[str, Any]:
        url = f"{self.url}/stats" + ("?log=1" if log else "")
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return dict(await r.json())

    async def configure(self, **changes: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(f"{self.url}/config", json=changes) as r:
            assert r.status == 200, await r.text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


StartMock = Callable[..., Awaitable[Mock]]  # the ``mock_llm`` fixture: one more mock endpoint


def start_mock(*args: str) -> Mock:
    port = free_port()
    proc = subprocess.Popen(
        [PY, "-m", "streams.tools.cli", "mock-llm", "--port", str(port), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return Mock(port, proc)


async def start_mocks(n: int, *args: str) -> list[Mock]:
    mocks = [start_mock(*args) for _ in range(n)]
    for m in mocks:
        await wait_http(f"{m.url}/stats")
    return mocks


def kafka_client_kwargs(bootstrap: str, sasl: Sasl | None) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap, **(sasl.client_kwargs() if sasl else {})}


@dataclass
class Stack:
    """One test's topics, group and config file."""

    tmp: Path
    endpoints: list[dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    kafka: str = KAFKA  # bootstrap servers
    sasl: Sasl | None = None
    redis_url: str = REDIS_URL

    @property
    def requests(self) -> str:
        return f"it-{self.name}.requests"

    @property
    def responses(self) -> str:
        return f"it-{self.name}.responses"

    @property
    def dlq(self) -> str:
        return f"it-{self.name}.dlq"

    @property
    def group(self) -> str:
        return f"it-{self.name}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "kafka": {"bootstrap_servers": self.kafka, **(self.sasl.config() if self.sasl else {}),
                      "group_id": self.group, "partitions": 4,
                      "commit_interval_seconds": 0.5, "session_timeout_seconds": 10},
            "topics": {"requests": self.requests, "responses": self.responses,
                       "dead_letter": self.dlq},
            "redis": {"url": self.redis_url, "key_prefix": f"it-{self.name}"},
            "retry": {"base_delay_ms": 20, "max_delay_ms": 200},
            "endpoints": self.endpoints,
            "metrics": {"port": 0},
            "worker": {"shutdown_grace_seconds": 5},
        }
        for dotted, value in self.overrides.items():
            node = cfg
            *path, last = dotted.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
        return cfg

    def write_config(self, **extra: Any) -> Path:
        cfg = self.config()
        for dotted, value in extra.items():
            section, key = dotted.split("__")
            cfg.setdefault(section, {})[key] = value
        path = self.tmp / f"config-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path

    async def ready(self, timeout: float = 60.0) -> None:
        await wait_http(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def metrics_text(self) -> str:
        """The worker's /metrics page (Prometheus text format)."""
        async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{self.metrics_port}/metrics"
        ) as r:
            return await r.text()

    async def metric(self, name: str) -> float:
        """The sum of every sample of the series ``name`` (all its labels)."""
        text = await self.metrics_text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))


def start_worker(stack: Stack, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 **extra: Any) -> Worker:
    """A worker process on the stack's config (``extra``: ``section__key`` overrides; ``args``:
    more command-line arguments, e.g. ``("--pipeline", NAME)``)."""
    port = free_port()
    cfg = stack.write_config(metrics__port=port, **extra)
    log = stack.tmp / f"worker-{port}.log"
    with log.open("wb") as out:  # the worker has its own copy of the handle
        proc = subprocess.Popen(
            [PY, "-m", "streams.tools.cli", "worker", "--config", str(cfg), *args],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    return Worker(proc, port, log)


@asynccontextmanager
async def running(stack: Stack, n: int = 1, *, settle: float = 0.0, clean_exit: bool = True,
                  env: dict[str, str] | None = None,
                  args: tuple[str, ...] = ()) -> AsyncIterator[list[Worker]]:
    """``n`` workers on the stack's config, ready (then ``settle`` seconds for the group to
    settle), stopped when the block ends; with ``clean_exit`` each must then exit 0."""
    workers = [start_worker(stack, env, args) for _ in range(n)]
    try:
        for w in workers:
            await w.ready()
        await asyncio.sleep(settle)
        yield workers
    finally:
        codes = [w.stop() for w in workers]
    if clean_exit:
        assert codes == [0] * n, f"worker exit codes {codes}"


async def settled_shares(workers: list[Worker], partitions: int, stable: float = 1.0,
                         timeout: float = 60.0) -> list[int]:
    """Each worker's count of assigned partitions once together they hold all ``partitions``
    and nothing changed for ``stable`` seconds."""
    deadline, since, last = time.monotonic() + timeout, time.monotonic(), None
    while time.monotonic() < deadline:
        held = [int(await w.metric("llm_streams_assigned_partitions")) for w in workers]
        if held != last or sum(held) != partitions:
            since, last = time.monotonic(), held
        elif time.monotonic() - since >= stable:
            return held
        await asyncio.sleep(0.1)
    raise AssertionError(f"the group did not settle in {timeout:.0f} s: {last}")


def window_sums(times: list[float], costs: list[int], width: float,
                 stalls: list[tuple[float, float]]) -> tuple[int, int, float]:
    """(max, min) of the units in any half-open window [t, t + width) starting at a call or just
    after one, among windows that lie within the calls' span and touch no stall of the mock
    (calls queued while it could not run are stamped together: see ``mockllm.server``); and the
    share of windows judged."""
    hi_best, lo_best = 0, None
    n = len(times)
    j, acc, judged = 0, 0, 0
    for i in range(n):  # windows starting at call i
        while j < n and times[j] < times[i] + width:
            acc += costs[j]
            j += 1
        t = times[i]
        if not any(a < t + width and b >= t for a, b in stalls):
            judged += 1
            hi_best = max(hi_best, acc)
            if j < n:  # a window starting just after call i ends within the span
                lo = acc - costs[i]
                lo_best = lo if lo_best is None else min(lo_best, lo)
        acc -= costs[i]
    return hi_best, (lo_best or 0), judged / max(n, 1)


def request(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"req-{i}", "input": f"prompt number {i}", **kw}


async def produce(topic: str, values: Iterable[bytes], keys: Iterable[bytes | None] | None = None,
                  bootstrap: str = KAFKA, sasl: Sasl | None = None) -> int:
    producer = AIOKafkaProducer(**kafka_client_kwargs(bootstrap, sasl), linger_ms=5, acks="all")
    await producer.start()
    n = 0
    try:
        futs = []
        key_iter = iter(keys) if keys is not None else None
        for v in values:
            k = next(key_iter) if key_iter is not None else None
            futs.append(await producer.send(topic, value=v, key=k))
            n += 1
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return n


def encode(docs: Iterable[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(d) for d in docs]


@dataclass
class Output:
    topic: str
    key: bytes | None
    value: dict[str, Any]
    headers: dict[str, bytes]
    timestamp: int = 0  # the record's timestamp, epoch ms


class Collector:
    """Reads the responses and dead-letter topics from the beginning."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.outputs: list[Output] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Collector:
        self._consumer = AIOKafkaConsumer(**kafka_client_kwargs(self.stack.kafka, self.stack.sasl),
                                          enable_auto_commit=False, auto_offset_reset="earliest")
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def _assign(self) -> None:
        c = self._consumer
        assert c is not None
        if c.assignment():
            return
        md = await c._client.fetch_all_metadata()
        tps = [TopicPartition(t, p) for t in (self.stack.responses, self.stack.dlq)
               for p in sorted(md.partitions_for_topic(t) or ())]
        if tps:
            c.assign(tps)
            await c.seek_to_beginning(*tps)

    async def poll(self) -> None:
        await self._assign()
        c = self._consumer
        assert c is not None
        if not c.assignment():
            await asyncio.sleep(0.3)
            return
        batches = await c.getmany(timeout_ms=300, max_records=10_000)
        for tp, msgs in batches.items():
            for m in msgs:
                self.outputs.append(Output(tp.topic, m.key, orjson.loads(m.value),
                                           dict(m.headers or ()), m.timestamp))

    def ids(self) -> set[str | None]:
        return {o.value.get("id") for o in self.outputs}

    async def wait_for(self, n: int, timeout: float = 120.0) -> list[Output]:
        """Wait until outputs for n distinct ids (or n outputs without id) have arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.poll()
            if self.distinct() >= n:
                # read a little longer to catch duplicates already in flight
                for _ in range(3):
                    await self.poll()
                return self.outputs
        raise TimeoutError(f"{self.distinct()} of {n} outputs after {timeout} s")

    def distinct(self) -> int:
        seen: set[Any] = set()
        for o in self.outputs:
            rid = o.value.get("id")
            seen.add(rid if rid is not None else ("offset", o.value["source"]["offset"],
                                                   o.value["source"]["partition"]))
        return len(seen)


async def answered(stack: Stack, docs: Iterable[dict[str, Any]], n: int | None = None,
                   timeout: float = 120.0) -> list[Output]:
    """Produce ``docs`` to the stack's requests topic and wait for ``n`` outputs (default: one
    per doc; see ``Collector.wait_for``); every output read, duplicates included."""
    values = encode(docs)
    async with Collector(stack) as col:
        await produce(stack.requests, values, bootstrap=stack.kafka, sasl=stack.sasl)
        return await col.wait_for(len(values) if n is None else n, timeout)


async def drained(mocks: Iterable[Mock], quiet: float = 0.5, timeout: float = 30.0) -> float:
    """Wait until the mocks take no new call for ``quiet`` seconds; return ``time.time()``
    then. A mock stamps a call when its loop gets to it, so calls a killed worker sent just
    before it died can be stamped after the kill: once drained, every call stamped before the
    returned time came from before it (the mock's clock for its calls)."""
    mocks = list(mocks)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        calls = sum([(await m.stats())["calls"] for m in mocks])
        if calls == last:
            return time.time()
        last = calls
        await asyncio.sleep(quiet)
    raise TimeoutError(f"the mocks were still taking calls after {timeout} s")


def calls_by_prompt(logs: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    """Each prompt's call times (``stats(log=True)``'s ``calls_log`` of one or more mocks)."""
    times: dict[str, list[float]] = {}
    for log in logs:
        for c in log["calls_log"]:
            times.setdefault(c["prompt"], []).append(c["t"])
    return times


async def kill_when_half_answered(stack: Stack, col: Collector, n: int) -> float:
    """A worker on the stack answers until ``col`` holds outputs for half of ``n`` requests,
    then is SIGKILLed (also if anything before fails). Returns the kill's ``time.time()``
    (the mock's clock for its calls)."""
    worker = start_worker(stack)
    try:
        await worker.ready()
        while col.distinct() < n // 2:
            await col.poll()
    finally:
        killed_at = time.time()
        worker.kill()
    return killed_at
