"""Client peers without Kafka: (b) a bare aiohttp loop, (c) openai AsyncOpenAI, (d) LiteLLM Router.

Each runs as its own process against the same stand-ins (two base URLs, weighted 3:1) at the
same concurrency and connection limit, after a short warm-up that is not counted, and prints
one JSON line: requests, errors, seconds, rate and CPU seconds of the load window::

    python -m bench.peers client|openai|litellm --url A --url B --n 5000 --concurrency 512

A peer whose library cannot be imported prints ``{"skipped": "<why>"}`` and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

WEIGHTS = (3, 1)
MODEL = "gpt-4o-mini"  # a name LiteLLM knows: an unknown one costs it extra per call

Call = Callable[[int], Awaitable[Any]]


def _weighted(urls: list[str]) -> itertools.cycle[str]:
    order = [urls[0]] * WEIGHTS[0] + [urls[-1]] * WEIGHTS[1]
    return itertools.cycle(order)


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"peer unique prompt {i}"}]


async def client_call(urls: list[str], conc: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc))
    order = _weighted([u + "/chat/completions" for u in urls])

    async def call(i: int) -> Any:
        body = orjson.dumps({"model": MODEL, "messages": _messages(i)})
        async with session.post(next(order), data=body, headers={"content-type": "application/json"}) as r:
            r.raise_for_status()
            return orjson.loads(await r.read())["choices"][0]["message"]["content"]

    return call, session.close


async def openai_call(urls: list[str], conc: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import httpx
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    clients = {u: AsyncOpenAI(base_url=u, api_key="bench", max_retries=0,
                              http_client=DefaultAsyncHttpxClient(limits=limits)) for u in urls}
    order = _weighted(urls)

    async def call(i: int) -> Any:
        resp = await clients[next(order)].chat.completions.create(model=MODEL, messages=_messages(i))
        return resp.choices[0].message.content

    async def close() -> None:
        for c in clients.values():
            await c.close()

    return call, close


async def litellm_call(urls: list[str], conc: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch it from the network
    import litellm
    from litellm import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    model_list = [
        {"model_name": MODEL,
         "litellm_params": {"model": f"openai/{MODEL}", "api_base": u, "api_key": "bench", "weight": w,
                            "max_parallel_requests": conc}}
        for u, w in zip(urls[:2], WEIGHTS, strict=False)
    ]
    router = Router(model_list=model_list, routing_strategy="simple-shuffle", num_retries=0)

    async def call(i: int) -> Any:
        resp = await router.acompletion(model=MODEL, messages=_messages(i))
        return resp.choices[0].message.content

    async def close() -> None:
        return None

    return call, close


FACTORIES = {"client": client_call, "openai": openai_call, "litellm": litellm_call}


async def drive(call: Call, n: int, conc: int, start: int = 0) -> int:
    """n calls with at most conc at once; returns the number of errors."""
    errors = 0
    it = iter(range(start, start + n))

    async def lane() -> None:
        nonlocal errors
        for i in it:
            try:
                await call(i)
            except Exception:
                errors += 1

    await asyncio.gather(*(lane() for _ in range(min(conc, n))))
    return errors


async def run(kind: str, urls: list[str], n: int, conc: int, timeout: float) -> dict[str, Any]:
    try:
        call, close = await FACTORIES[kind](urls, conc)
    except Exception as exc:  # an SDK that cannot be imported is skipped, not fatal
        return {"skipped": f"{kind} unavailable: {type(exc).__name__}: {exc}"[:300]}
    try:
        # warm-up, not counted: fills every client's connection pool and runs lazy imports
        await asyncio.wait_for(drive(call, max(conc, 100), conc, start=10_000_000), timeout)
        cpu0, t0 = _cpu(), time.perf_counter()
        errors = await asyncio.wait_for(drive(call, n, conc), timeout)
        secs, cpu = time.perf_counter() - t0, _cpu() - cpu0
    finally:
        await close()
    ok = n - errors
    return {"n": n, "ok": ok, "errors": errors, "seconds": secs, "rate": ok / secs,
            "cpu_s": cpu, "cpu_per_req_us": cpu / max(1, ok) * 1e6}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=sorted(FACTORIES))
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=512)
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        result = asyncio.run(run(args.kind, args.url, args.n, args.concurrency, args.timeout))
    except TimeoutError:
        result = {"error": f"timed out after {args.timeout} s"}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
