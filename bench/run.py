"""Entry point of the benchmark harness.

    python -m bench.run [--size smoke|full] [--out BENCHMARKS.md] [--json bench/results.json]
                        [--only miss_path,cache_hit,...] [--no-peers]

Needs Kafka on 127.0.0.1:9092 and Redis on 127.0.0.1:6379 (``make stack-up``) and nginx
(elsewhere: BENCH_KAFKA_BOOTSTRAP, BENCH_REDIS_PORT).
It starts nginx, mocks, workers and peers itself and stops all of them on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from bench import report
from bench.procs import Procs, free_port
from bench.scenarios import SCENARIOS, SIZES, Env
from bench.stats import summarize

RUN_LIMIT = {"smoke": 90.0, "full": 900.0}  # seconds, per scenario run


async def run_all(procs: Procs, size_name: str, only: list[str], peers: bool) -> dict[str, Any]:
    size = SIZES[size_name]
    ports = [free_port(), free_port()]
    await procs.nginx(ports)
    notes: list[str] = []
    env = Env(procs, [f"http://127.0.0.1:{p}/v1" for p in ports], size, peers=peers, notes=notes)
    results: dict[str, Any] = {}
    for name in only:
        fn = SCENARIOS[name]
        runs: list[dict[str, Any]] = []
        errors: list[str] = []
        for i in range(size.runs):
            t = time.monotonic()
            print(f"[bench] {name} run {i + 1}/{size.runs} ...", file=sys.stderr, flush=True)
            try:
                r = await asyncio.wait_for(fn(env), RUN_LIMIT[size_name])
                runs.append(r)
            except Exception as exc:  # one failed run is reported, the others still count
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                traceback.print_exc()
            print(f"[bench] {name} run {i + 1} took {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        results[name] = {"runs": runs, "summary": summarize(runs), "errors": errors}
    return {"scenarios": results, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--json", default="bench/results.json")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenario names")
    p.add_argument("--no-peers", action="store_true", help="llm-streams only on the miss path")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    def _term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    procs = Procs()
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        out = asyncio.run(run_all(procs, args.size, only, not args.no_peers))
    finally:
        procs.close()
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    doc = {"command": command.strip(), "size": args.size, "runs": SIZES[args.size].runs,
           "machine": report.machine(), **out}
    doc["targets"] = report.evaluate(doc["scenarios"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    Path(args.out).write_text(report.markdown(doc))
    print(report.markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
