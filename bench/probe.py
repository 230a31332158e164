"""Light instrumentation of a worker (or a bare peer): where a slow upstream's tail comes from.

    python -m bench.probe --out FILE [--cli MODULE] worker --config cfg.yaml

installs the hooks below, then runs the worker's CLI in the same process. A daemon thread writes
the cumulative figures to FILE (JSON) four times a second; the harness reads FILE at the start
and the end of a measurement window and reports the difference (``window``). The hooks:

- event-loop lag: a task on the main loop sleeps 20 ms at a time and records how late it wakes
  (started when a Kafka producer starts on the main thread: the worker's and the peers' live
  on the main loop);
- garbage collection: ``gc.callbacks`` times every collection, per generation;
- produce batching: aiokafka's sender counts produce requests, the records in them and their
  round trip;
- fetch cadence: aiokafka's fetcher counts the fetches that returned records, the records in
  each and the gaps between them (faust fetches on its own thread's loop: the figures are
  the same for the worker and the peers).

Each hook costs a few microseconds per event; the lag sampler 50 wake-ups a second.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import sys
import threading
import time
from typing import Any

LAG_BUCKETS_MS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 1e9)
LAG_TICK = 0.02

STATE: dict[str, Any] = {
    "lag_hist": [0] * len(LAG_BUCKETS_MS), "lag_max_ms": 0.0, "lag_sum_ms": 0.0,
    "gc_count": [0, 0, 0], "gc_ms": [0.0, 0.0, 0.0], "gc_max_ms": [0.0, 0.0, 0.0],
    "produce_requests": 0, "produce_records": 0, "produce_ms": 0.0,
    "fetches": 0, "fetch_records": 0, "fetch_gap_hist": [0] * len(LAG_BUCKETS_MS), "fetch_gap_max_ms": 0.0,
}
_gc_start = [0.0]
_last_fetch = [0.0]


def _bucket(hist: list[int], ms: float) -> None:
    for i, edge in enumerate(LAG_BUCKETS_MS):
        if ms <= edge:
            hist[i] += 1
            return


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
        return
    g = int(info.get("generation", 0))
    ms = (time.perf_counter() - _gc_start[0]) * 1000
    STATE["gc_count"][g] += 1
    STATE["gc_ms"][g] += ms
    STATE["gc_max_ms"][g] = max(STATE["gc_max_ms"][g], ms)


async def _lag_sampler() -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(LAG_TICK)
        lag = max(0.0, (time.perf_counter() - t - LAG_TICK) * 1000)
        _bucket(STATE["lag_hist"], lag)
        STATE["lag_sum_ms"] += lag
        STATE["lag_max_ms"] = max(STATE["lag_max_ms"], lag)


def _start_sampler() -> None:
    """One sampler, on the main thread's running loop: a loop that ended (a start-up check's
    ``asyncio.run``) cancelled the previous one, so the next producer's loop gets it."""
    if threading.current_thread() is not threading.main_thread():
        return  # faust's consumer thread runs its own loop
    task = STATE.get("_sampler")
    if task is None or task.done():
        STATE["_sampler"] = asyncio.get_running_loop().create_task(_lag_sampler())


def _patch() -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.consumer.fetcher import Fetcher
    from aiokafka.producer.sender import Sender

    start = AIOKafkaProducer.start

    async def producer_start(self: Any) -> None:
        _start_sampler()
        await start(self)

    send_req = Sender._send_produce_req

    async def send_produce_req(self: Any, node_id: int, batches: dict[Any, Any]) -> None:
        t = time.perf_counter()
        STATE["produce_requests"] += 1
        STATE["produce_records"] += sum(b.record_count for b in batches.values())
        try:
            await send_req(self, node_id, batches)
        finally:
            STATE["produce_ms"] += (time.perf_counter() - t) * 1000

    fetched = Fetcher.fetched_records

    async def fetched_records(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = await fetched(self, *args, **kwargs)
        n = sum(len(v) for v in out.values()) if out else 0
        if n:
            now = time.perf_counter()
            if _last_fetch[0]:
                gap = (now - _last_fetch[0]) * 1000
                _bucket(STATE["fetch_gap_hist"], gap)
                STATE["fetch_gap_max_ms"] = max(STATE["fetch_gap_max_ms"], gap)
            _last_fetch[0] = now
            STATE["fetches"] += 1
            STATE["fetch_records"] += n
        return out

    AIOKafkaProducer.start = producer_start
    Sender._send_produce_req = send_produce_req
    Fetcher.fetched_records = fetched_records


def _writer(path: str) -> None:
    while True:
        doc = {k: v for k, v in STATE.items() if not k.startswith("_")}
        doc["t"] = time.time()
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
        time.sleep(0.25)


def install(path: str) -> None:
    """Install every hook and start the writer thread (call before the event loop starts)."""
    gc.callbacks.append(_on_gc)
    _patch()
    threading.Thread(target=_writer, args=(path,), daemon=True, name="bench-probe").start()


def read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            doc: dict[str, Any] = json.load(f)
            return doc
    except (OSError, ValueError):
        return None


def _hist_quantile(hist: list[int], q: float, top: float) -> float | None:
    """The upper edge of the bucket holding quantile q; ``top`` (the largest value seen) past
    the last finite edge."""
    total = sum(hist)
    if not total:
        return None
    seen = 0
    for edge, n in zip(LAG_BUCKETS_MS, hist, strict=True):
        seen += n
        if seen >= q * total:
            return float(edge) if edge < LAG_BUCKETS_MS[-1] else top
    return None


def window(before: dict[str, Any] | None, after: dict[str, Any] | None, answered: int) -> dict[str, Any]:
    """The figures of one measurement window (after - before), flat, for the report."""
    if not after:
        return {}
    b = before or {k: (0 if not isinstance(v, list) else [0] * len(v)) for k, v in after.items()}

    def d(key: str) -> Any:
        a, z = after[key], b[key]
        return [x - y for x, y in zip(a, z, strict=True)] if isinstance(a, list) else a - z

    lag = d("lag_hist")
    samples = sum(lag)
    gaps = d("fetch_gap_hist")
    gc_ms, gc_count = d("gc_ms"), d("gc_count")
    per = max(1, answered)
    return {
        "loop_lag_p50_ms": _hist_quantile(lag, 0.5, after["lag_max_ms"]),
        "loop_lag_p99_ms": _hist_quantile(lag, 0.99, after["lag_max_ms"]),
        "loop_lag_mean_ms": d("lag_sum_ms") / samples if samples else None,
        "loop_lag_max_ms": after["lag_max_ms"],  # since start (a maximum does not subtract)
        "loop_lag_over_50ms": sum(n for e, n in zip(LAG_BUCKETS_MS, lag, strict=True) if e > 50) / max(1, samples),
        "gc_gen2": gc_count[2], "gc_gen1": gc_count[1], "gc_gen0": gc_count[0],
        "gc_ms": sum(gc_ms), "gc_us_per_req": sum(gc_ms) * 1000 / per,
        "gc_max_ms": max(after["gc_max_ms"]),
        "produce_requests": d("produce_requests"),
        "records_per_produce": d("produce_records") / max(1, d("produce_requests")),
        "produce_rtt_ms": d("produce_ms") / max(1, d("produce_requests")),
        "fetches": d("fetches"), "records_per_fetch": d("fetch_records") / max(1, d("fetches")),
        "fetch_gap_p50_ms": _hist_quantile(gaps, 0.5, after["fetch_gap_max_ms"]),
        "fetch_gap_p99_ms": _hist_quantile(gaps, 0.99, after["fetch_gap_max_ms"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probe")
    p.add_argument("--out", required=True)
    p.add_argument("--cli", default="streams.tools.cli", help="the module whose main() runs next")
    args, rest = p.parse_known_args()
    install(args.out)
    sys.argv = [args.cli, *rest]
    cli = importlib.import_module(args.cli)
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
