"""Profile the worker in one scenario: py-spy samples it while the scenario runs.

    python -m bench.profile cache_hit [--set hit_n=60000] [--seconds 30] [--out prof.txt] [--top 40]

Runs the scenario once at the smoke size with the given overrides (Size fields), attaches
``py-spy record --gil`` to each worker it starts, and prints the frames with the most samples
(own time and inclusive). Needs py-spy (the ``bench`` extra) and the stack, like bench.run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import Env
from bench.procs import Procs, free_port
from bench.scenarios import SCENARIOS, SIZES


def top_frames(path: Path, k: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    out = [f"{total} samples", "", "own time:"]
    out += [f"{c / total * 100:5.1f}%  {f}" for f, c in own.most_common(k)]
    out += ["", "inclusive:"]
    out += [f"{c / total * 100:5.1f}%  {f}" for f, c in incl.most_common(k)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--set", action="append", default=[], help="Size field override, e.g. hit_n=60000")
    p.add_argument("--seconds", type=float, default=30.0, help="py-spy sampling time per worker")
    p.add_argument("--out", default="bench/profile.txt")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    base = SIZES["smoke"]
    changes: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key] = type(getattr(base, key))(value)
    size = dataclasses.replace(base, **changes)
    out = Path(args.out)
    samplers: list[subprocess.Popen[bytes]] = []
    spawn_worker = Procs.worker

    def worker(self: Procs, cfg: dict[str, Any], name: str,
               probe: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
        proc, port = spawn_worker(self, cfg, name, probe)
        target = out if not samplers else out.with_suffix(f".{len(samplers)}.txt")
        samplers.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid), "--format", "raw",
             "--rate", "250", "--gil", "--nonblocking", "--duration", str(int(args.seconds)),
             "-o", str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return proc, port

    Procs.worker = worker  # type: ignore[method-assign]

    async def run(procs: Procs) -> dict[str, Any]:
        ports = [free_port(), free_port()]
        await procs.nginx(ports)
        env = Env(procs, [f"http://127.0.0.1:{q}/v1" for q in ports], size, peers=False)
        return await SCENARIOS[args.scenario](env)

    procs = Procs()
    try:
        result = asyncio.run(run(procs))
    finally:
        procs.close()
    deadline = time.monotonic() + args.seconds + 10
    for s in samplers:
        s.wait(max(1.0, deadline - time.monotonic()))
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()})
    if out.exists():
        print(top_frames(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
