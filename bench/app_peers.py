"""The Kafka apps a user would write instead of llm-streams, each calling the upstream with the
openai SDK: a faststream app (``AsyncOpenAI``, ``max_workers`` = the concurrency) and a Quix
Streams app (synchronous ``OpenAI``, one call per message: Quix Streams processes a partition's
messages one at a time). Both consume the requests topic and publish one response per request::

    python -m bench.app_peers faststream|quix --requests T --responses T2 --group G \
        --url http://.../v1 [--url ...] --concurrency 512

Each prints ``READY`` when started (stdout then goes to stderr) and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
from typing import Any

from bench.peers import MODEL, WEIGHTS
from bench.procs import KAFKA


def _order(urls: list[str]) -> itertools.cycle[str]:
    return itertools.cycle([urls[0]] * WEIGHTS[0] + [urls[-1]] * WEIGHTS[1])


def _ready() -> None:
    print("READY", flush=True)
    os.dup2(2, 1)  # the harness reads one line; logs must not fill its pipe


def _answer(req: dict[str, Any], content: str | None) -> dict[str, Any]:
    return {"id": req["id"], "status": "ok", "output": content}


def faststream_app(args: argparse.Namespace) -> None:
    """faststream: a concurrent subscriber; ``ack_policy=ACK_FIRST`` is what its concurrent
    subscriber needs (auto-commit: at most once, unlike the worker)."""
    import httpx
    from faststream import AckPolicy, FastStream
    from faststream.kafka import KafkaBroker
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    clients = {u: AsyncOpenAI(base_url=u, api_key="bench", max_retries=0,
                              http_client=DefaultAsyncHttpxClient(limits=limits)) for u in args.url}
    order = _order(args.url)
    broker = KafkaBroker(KAFKA, logger=None)
    app = FastStream(broker, logger=None)

    @broker.subscriber(args.requests, group_id=args.group, auto_offset_reset="earliest",
                       max_workers=args.concurrency, ack_policy=AckPolicy.ACK_FIRST)
    @broker.publisher(args.responses)
    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        resp = await clients[next(order)].chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": req["input"]}])
        return _answer(req, resp.choices[0].message.content)

    @app.after_startup
    async def started() -> None:
        _ready()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(app.run())


def quix_app(args: argparse.Namespace) -> None:
    """Quix Streams: ``sdf.apply`` with the synchronous client (its processing is synchronous)."""
    from openai import DefaultHttpxClient, OpenAI
    from quixstreams import Application

    clients = {u: OpenAI(base_url=u, api_key="bench", max_retries=0, http_client=DefaultHttpxClient())
               for u in args.url}
    order = _order(args.url)
    app = Application(broker_address=KAFKA, consumer_group=args.group, auto_offset_reset="earliest",
                      auto_create_topics=False, loglevel="WARNING")
    requests = app.topic(args.requests, value_deserializer="json")
    responses = app.topic(args.responses, value_serializer="json")

    def call(req: dict[str, Any]) -> dict[str, Any]:
        resp = clients[next(order)].chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": req["input"]}])
        return _answer(req, resp.choices[0].message.content)

    sdf = app.dataframe(requests).apply(call)
    sdf.to_topic(responses)
    _ready()
    app.run()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.app_peers")
    p.add_argument("kind", choices=("faststream", "quix"))
    p.add_argument("--requests", required=True)
    p.add_argument("--responses", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--concurrency", type=int, default=512, help="faststream's max_workers (Quix: 1)")
    args = p.parse_args()
    try:
        (faststream_app if args.kind == "faststream" else quix_app)(args)
    except ImportError as exc:
        print(f"SKIPPED {exc}", flush=True)
        sys.exit(0)


if __name__ == "__main__":
    main()
