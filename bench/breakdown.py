"""Where a request's CPU goes, by library, in the worker and in its floor, side by side.

    python -m bench.breakdown [--paths miss,hit,slow] [--runs 2] [--out bench/BREAKDOWN.md]

For each path, one worker run and one run of its floor (the same stand-ins, sizes of ``make
bench``): the miss path against the bare pipeline (nginx upstream, cache off), the cache-hit
path against the bare relay, the slow upstream (the mock at 1 s +- 0.5 s) against the bare
pipeline at one paced rate both sustain. ``py-spy record --gil`` samples each measured process
from the first request produced to the last answer (the window of the figures, start-up left
out). Each sample's innermost Python frame names the library whose code held the GIL (C code
counts for the Python frame that called it); a library's share of the samples times the
process's CPU per request (utime + stime over the same window) is its microseconds per request.
Needs py-spy (the ``bench`` extra) and the stack, like bench.run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from bench import harness, paced, scenarios
from bench.harness import Env
from bench.procs import Procs, free_port

# (prefix of a frame's file, as py-spy prints it; group). The first match wins; llm-streams'
# own packages are split out below.
GROUPS: tuple[tuple[str, str], ...] = (
    ("faust/", "faust + mode (stream framework)"),
    ("mode/", "faust + mode (stream framework)"),
    ("aiokafka/", "aiokafka (Kafka client)"),
    ("kafka/", "aiokafka (Kafka client)"),
    ("aiohttp/", "aiohttp + yarl + multidict (HTTP client)"),
    ("yarl/", "aiohttp + yarl + multidict (HTTP client)"),
    ("multidict/", "aiohttp + yarl + multidict (HTTP client)"),
    ("aiosignal/", "aiohttp + yarl + multidict (HTTP client)"),
    ("frozenlist/", "aiohttp + yarl + multidict (HTTP client)"),
    ("redis/", "redis-py (Redis client)"),
    ("hiredis/", "redis-py (Redis client)"),
    ("pydantic/", "pydantic (validation)"),
    ("pydantic_core/", "pydantic (validation)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("asyncio/", "asyncio + uvloop (event loop, tasks, timers)"),
    ("uvloop/", "asyncio + uvloop (event loop, tasks, timers)"),
    ("json/", "json (stdlib)"),
    ("logging/", "logging"),
    ("bench/", "the floor's own code (bench/)"),
    ("streams/intake/", "llm-streams: intake (agent, processor, acks, offsets)"),
    ("streams/dispatch/", "llm-streams: dispatch (admission, balancer, calls)"),
    ("streams/cache/", "llm-streams: cache, idempotency, locks"),
    ("streams/pipelines/", "llm-streams: pipelines"),
    ("streams/", "llm-streams: other (contract, metrics, redis guard, pricing)"),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
LOOP = "asyncio + uvloop (event loop, tasks, timers)"
# Frames that run the event loop: their own time is the loop's C code (uvloop: polling, timers,
# socket reads and writes, calling back), not the library that started the loop.
LOOP_RUNNERS = frozenset({"Worker.execute_from_commandline (mode/worker.py)",
                          "BaseEventLoop.run_until_complete (asyncio/base_events.py)"})


def group_of(frame: str) -> str:
    """The library a py-spy frame (``func (path/file.py:line)``) belongs to."""
    if re.sub(r":\d+\)$", ")", frame) in LOOP_RUNNERS:
        return LOOP
    m = _FRAME.match(frame)
    path = m.group("file") if m else frame
    if "site-packages/" in path:
        path = path.rsplit("site-packages/", 1)[1]
    for prefix, group in GROUPS:
        if path.startswith(prefix) or f"/{prefix}" in path:
            return group
    if path.startswith("<frozen") or "importlib" in path:
        return "imports"
    return "other (stdlib and the rest)"


def shares(lines: Iterable[str], frames: collections.Counter[str] | None = None,
           ) -> tuple[collections.Counter[str], int]:
    """Samples per group (by each sample's innermost frame) and the total, from py-spy's raw
    format: one ``frame;frame;...;frame count`` per line. Lines that are not stacks are skipped.
    With ``frames``, also counts the samples of each innermost frame (its line number dropped)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, n = line.strip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        inner = stack.split(";")[-1]
        counts[group_of(inner)] += int(n)
        total += int(n)
        if frames is not None:
            frames[re.sub(r":\d+\)$", ")", inner)] += int(n)
    return counts, total


@dataclasses.dataclass
class Sampled:
    """One measured process: its CPU per request over the window and py-spy's samples."""

    cpu_us: float  # CPU microseconds per answered request
    counts: collections.Counter[str]
    total: int
    frames: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def us_per_request(self) -> dict[str, float]:
        return {g: self.cpu_us * n / self.total for g, n in self.counts.items()} if self.total else {}


def table(rows: dict[str, tuple[list[Sampled], list[Sampled]]]) -> str:
    """Markdown: per path, each group's us/request in the worker and in the floor (medians)."""
    out: list[str] = []
    for path, (worker, floor) in rows.items():
        w = _median_groups(worker)
        f = _median_groups(floor)
        cw = statistics.median(s.cpu_us for s in worker) if worker else 0.0
        cf = statistics.median(s.cpu_us for s in floor) if floor else 0.0
        out += [f"### {path}", "",
                "| library (innermost frame) | worker us/req | floor us/req | worker - floor |",
                "| --- | --- | --- | --- |"]
        for g in sorted(set(w) | set(f), key=lambda g: -(w.get(g, 0.0) - f.get(g, 0.0))):
            a, b = w.get(g, 0.0), f.get(g, 0.0)
            if a < 0.5 and b < 0.5:
                continue
            out.append(f"| {g} | {a:,.1f} | {b:,.1f} | {a - b:+,.1f} |")
        out += [f"| **all (CPU per request over the window)** | **{cw:,.1f}** | **{cf:,.1f}** | "
                f"**{cw - cf:+,.1f}** |", ""]
        out += _top_frames(worker, w)
        out += ["",
                f"Samples: worker {', '.join(f'{s.total:,}' for s in worker)}; "
                f"floor {', '.join(f'{s.total:,}' for s in floor)}.", ""]
    return "\n".join(out)


def _top_frames(runs: list[Sampled], groups: dict[str, float], k: int = 4, floor_us: float = 4.0,
                ) -> list[str]:
    """The worker's heaviest functions (own time, all runs together) in each group over ``floor_us``."""
    frames: collections.Counter[str] = collections.Counter()
    total = sum(r.total for r in runs)
    for r in runs:
        frames.update(r.frames)
    cpu = statistics.median(r.cpu_us for r in runs) if runs else 0.0
    out = []
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        if us < floor_us or not total:
            continue
        top = [(f, n) for f, n in frames.most_common() if group_of(f) == g][:k]
        listed = "; ".join(f"`{f}` {cpu * n / total:,.1f}" for f, n in top)
        out.append(f"- worker, {g}: {listed}")
    return out


def _median_groups(runs: list[Sampled]) -> dict[str, float]:
    per = [r.us_per_request() for r in runs]
    groups = {g for p in per for g in p}
    return {g: statistics.median(p.get(g, 0.0) for p in per) for g in groups}


class Sampler:
    """Wraps bench.harness.measure: py-spy samples the measured processes for its window."""

    def __init__(self, folder: Path, keep: Path | None = None) -> None:
        self.folder = keep or folder  # raw profiles: kept with --keep, else removed with the run
        self.taken: list[Sampled] = []
        self._original = harness.measure

    def install(self) -> None:
        for module in (harness, scenarios, paced):
            module.measure = self.measure  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        for module in (harness, scenarios, paced):
            module.measure = self._original  # type: ignore[attr-defined]

    async def measure(self, topics: Any, pids: list[int], values: list[bytes], **kw: Any) -> dict[str, Any]:
        outs = [self.folder / f"spy-{pid}-{len(self.taken)}.txt" for pid in pids]
        spies = [subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--format", "raw",
             "--rate", "400", "--gil", "--nonblocking", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid, out in zip(pids, outs, strict=True)]
        await asyncio.sleep(1.0)  # py-spy attaches before the first request
        try:
            m = await self._original(topics, pids, values, **kw)
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                await asyncio.to_thread(spy.wait, 30)
        counts: collections.Counter[str] = collections.Counter()
        frames: collections.Counter[str] = collections.Counter()
        total = 0
        for out in outs:
            if out.exists():
                c, t = shares(out.read_text().splitlines(), frames)
                counts.update(c)
                total += t
        # per request produced in the window (every one is answered in these runs; a cache-hit
        # run's outputs also count its warm-up's, produced before the window)
        self.taken.append(Sampled(m["cpu"] / max(1, len(values)) * 1e6, counts, total, frames))
        return m


PATHS: dict[str, tuple[Callable[[Env], Awaitable[Any]], Callable[[Env], Awaitable[Any]]]] = {
    "miss": (lambda env: scenarios.streams_miss(env, env.size.miss_n),
             lambda env: scenarios.bare_pipeline(env, env.size.miss_n)),
    "hit": (scenarios.cache_hit, scenarios.bare_relay),
    "slow": (lambda env: paced.paced_mock(env, "slow", *paced.SLOW, env.size.slow_rate, env.size.slow_seconds,
                                          env.size.slow_inflight),
             lambda env: paced.paced_mock(env, "slow", *paced.SLOW, env.size.slow_rate, env.size.slow_seconds,
                                          env.size.slow_inflight, who="bare")),
}
TITLES = {
    "miss": "Miss path (nginx upstream, cache off) against the bare pipeline",
    "hit": "Cache-hit path against the bare relay",
    "slow": "Slow upstream (mock 1 s +- 0.5 s, paced) against the bare pipeline at the same rate",
}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.breakdown")
    p.add_argument("--paths", default="miss,hit,slow")
    p.add_argument("--runs", type=int, default=2, help="runs of each process, alternating")
    p.add_argument("--slow-rate", type=float, default=2000.0, help="paced req/s of the slow path")
    p.add_argument("--size", choices=sorted(scenarios.SIZES), default="full")
    p.add_argument("--out", default="bench/BREAKDOWN.md")
    p.add_argument("--keep", type=Path, help="a folder to keep py-spy's raw profiles in")
    args = p.parse_args()
    size = dataclasses.replace(scenarios.SIZES[args.size], slow_rate=args.slow_rate)
    paths = [x for x in args.paths.split(",") if x]
    procs = Procs()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(procs.tmp, args.keep)
    sampler.install()
    rows: dict[str, tuple[list[Sampled], list[Sampled]]] = {}

    async def run() -> None:
        ports = [free_port(), free_port()]
        await procs.nginx(ports)
        env = Env(procs, [f"http://127.0.0.1:{q}/v1" for q in ports], size, peers=False)
        for path in paths:
            worker_fn, floor_fn = PATHS[path]
            got: tuple[list[Sampled], list[Sampled]] = ([], [])
            for _ in range(args.runs):
                for fn, into in ((worker_fn, got[0]), (floor_fn, got[1])):
                    before = len(sampler.taken)
                    await fn(env)
                    into.extend(sampler.taken[before:][-1:])  # the measured window (the hit warm-up is not)
            rows[TITLES[path]] = got

    try:
        asyncio.run(run())
    finally:
        sampler.uninstall()
        procs.close()
    text = table(rows)
    header = ("Generated by `python -m bench.breakdown " + " ".join(sys.argv[1:]) + "` "
              f"({args.runs} run(s) of each, alternating; medians).\n\n")
    Path(args.out).write_text(header + text + "\n")
    print(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
