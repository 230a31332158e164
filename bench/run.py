"""Entry point of the benchmark harness.

    python -m bench.run [--size smoke|full] [--out BENCHMARKS.md] [--json bench/results.json]
                        [--only miss_path,cache_hit,...] [--no-peers]
    python -m bench.run --compare REV_A REV_B [--scenarios miss,hit] [--size ...] [--runs N]
                        (two commits side by side, alternating: bench.compare; writes
                        bench/COMPARE.md and bench/compare.json unless --out/--json say otherwise)

Needs Kafka on 127.0.0.1:9092 and Redis on 127.0.0.1:6379 (``make stack-up``) and nginx
(elsewhere: BENCH_KAFKA_BOOTSTRAP, BENCH_REDIS_PORT).
It starts nginx, mocks, workers and peers itself and stops all of them on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from bench import compare, report
from bench.harness import Env
from bench.procs import Procs, free_port
from bench.scenarios import SCENARIOS, SIZES
from bench.stats import summarize

RUN_LIMIT = {"smoke": 180.0, "full": 900.0}  # seconds, per scenario run


async def run_all(procs: Procs, size_name: str, only: list[str], peers: bool, n_runs: int) -> dict[str, Any]:
    size = dataclasses.replace(SIZES[size_name], runs=n_runs)
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


def _command(argv: list[str] | None) -> str:
    return ("python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))).strip()


def _run(procs: Procs, coro: Any) -> dict[str, Any]:
    """Run the harness's coroutine with uvloop; stop every process of ``procs`` on the way out,
    SIGTERM included."""

    def _term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        result: dict[str, Any] = asyncio.run(coro)
        return result
    finally:
        procs.close()


def _compare(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    names = [s for s in args.scenarios.split(",") if s]
    unknown = set(names) - set(compare.SCENARIOS)
    if unknown:
        p.error(f"unknown --scenarios: {', '.join(sorted(unknown))} (known: {', '.join(compare.SCENARIOS)})")
    size = SIZES[args.size]
    runs = args.runs or size.runs
    procs = Procs()

    def env_for(urls: list[str]) -> Env:
        return Env(procs, urls, size, peers=False)

    out = _run(procs, compare.run_compare(procs, env_for, args.compare, names, runs))
    doc = {"command": _command(argv), "size": args.size, "runs": runs, "machine": report.machine(), **out}
    json_path, md_path = Path(args.json or "bench/compare.json"), Path(args.out or "bench/COMPARE.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    md_path.write_text(compare.markdown(doc))
    print(compare.markdown(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default=None, help="BENCHMARKS.md (bench/COMPARE.md with --compare)")
    p.add_argument("--json", default=None, help="bench/results.json (bench/compare.json with --compare)")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenario names")
    p.add_argument("--no-peers", action="store_true", help="llm-streams only on the miss path")
    p.add_argument("--compare", nargs=2, metavar=("REV_A", "REV_B"), help="two commits side by side")
    p.add_argument("--scenarios", default="miss,hit", help=f"with --compare: {','.join(compare.SCENARIOS)}")
    p.add_argument("--runs", type=int, default=None, help="runs per scenario (and revision); default: the size's")
    args = p.parse_args(argv)
    if args.compare:
        return _compare(p, args, argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.out = args.out or "BENCHMARKS.md"
    args.json = args.json or "bench/results.json"
    runs = args.runs or SIZES[args.size].runs
    procs = Procs()
    out = _run(procs, run_all(procs, args.size, only, not args.no_peers, runs))
    doc = {"command": _command(argv), "size": args.size, "runs": runs,
           "machine": report.machine(), **out}
    doc["targets"] = report.evaluate(doc["scenarios"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    Path(args.out).write_text(report.markdown(doc))
    print(report.markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
