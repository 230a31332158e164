"""faust's own cost per record, with no work at all: the floor under any faust agent.

    python -m bench.faust_floor [--n 60000]

Fills a fresh topic with ``n`` request records, then for each way of reading it starts a
fresh faust app (uvloop) that acks every record and does nothing else, and prints records/s
and CPU microseconds per record (the whole process, faust's consumer thread included):

- ``stream``: ``async for event in stream.noack().events(): event.ack()`` (faust's idiom)
- ``take``: ``stream.noack().take_events(1000, within=5 ms)``
- ``queue``: drain the agent's channel queue directly
- ``direct``: ``queue`` with ``streams.faust_io``'s transport (what ``streams/worker.py`` does:
  no tasks per record between faust's fetcher and the conductor)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from typing import Any

from bench import kafka_load as kl
from bench.procs import KAFKA, PY

MODES = ("stream", "take", "queue", "direct")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def consume(topic: str, n: int, mode: str) -> None:  # noqa: C901 (three small readers)
    """Child process: one faust app reading ``topic`` in ``mode``; prints one line."""
    import faust
    import uvloop

    from streams.intake.transport import new_transport

    class App(faust.App):
        def _new_transport(self) -> Any:
            return new_transport(self) if mode == "direct" else super()._new_transport()

    app = App(f"floor-{topic}-{mode}", broker=f"kafka://{KAFKA}", web_enabled=False,
                    consumer_auto_offset_reset="earliest", stream_buffer_maxsize=4096,
                    datadir=f"/tmp/faust-floor-{os.getpid()}")
    chan = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw")
    state: dict[str, Any] = {"n": 0}

    def tick() -> None:
        if state["n"] == 0:
            state["t0"], state["c0"] = time.monotonic(), _cpu()
        state["n"] += 1
        if state["n"] >= n:
            dt, cpu = time.monotonic() - state["t0"], _cpu() - state["c0"]
            print(f"{mode}: {n / dt:,.0f} records/s, {cpu / n * 1e6:.0f} us CPU/record", flush=True)
            os._exit(0)

    async def agent(stream: Any) -> None:
        if mode == "stream":
            async for ev in stream.noack().events():
                tick()
                ev.ack()
        elif mode == "take":
            async for evs in stream.noack().take_events(1000, within=0.005):
                for ev in evs:
                    tick()
                    ev.ack()
        else:
            queue = stream.channel.queue
            while True:
                evs = [await queue.get()]
                while True:
                    try:
                        evs.append(queue.get_nowait())
                    except asyncio.QueueEmpty:
                        break
                for ev in evs:
                    tick()
                    ev.ack()

    app.agent(chan, name="floor")(agent)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    faust.Worker(app, loop=loop, loglevel="warning", quiet=True).execute_from_commandline()


async def fill(n: int) -> kl.Topics:
    topics = kl.Topics.unique("floor")
    await kl.create_topics(topics)
    await kl.produce(topics.requests, kl.requests(n, "floor"))
    return topics


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faust_floor")
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--child", nargs=2, metavar=("TOPIC", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        consume(args.child[0], args.n, args.child[1])
        return 0
    topics = asyncio.run(fill(args.n))
    try:
        for mode in MODES:
            out = subprocess.run([PY, "-m", "bench.faust_floor", "--n", str(args.n), "--child",
                                  topics.requests, mode], capture_output=True, text=True, timeout=300)
            # faust's worker may route stdout through its logging (then the line is on stderr)
            lines = [ln[ln.index(f"{mode}: "):] for ln in (out.stdout + out.stderr).splitlines()
                     if f"{mode}: " in ln and "records/s" in ln]
            print(lines[-1] if lines else f"{mode}: failed ({out.stderr.strip()[-300:]})", flush=True)
    finally:
        asyncio.run(kl.delete_topics(topics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
