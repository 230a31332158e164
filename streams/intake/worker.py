"""The worker process: checks at start, the event loop, and faust's worker around the app.

Usage::

    run_worker(load_settings("config/default.yaml"))
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

import faust
from prometheus_client import CollectorRegistry

from streams.config import Settings
from streams.intake.agent import build_app
from streams.intake.front import Front
from streams.intake.runtime import Runtime
from streams.kafka_io import check_kafka, ensure_topics
from streams.redact import redact_url
from streams.redis_io import check_redis, open_redis

log = logging.getLogger("streams.worker")


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop when configured and installed (a fraction of asyncio's cost per event)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # an optional speed-up: run on asyncio's loop without it
            log.warning("worker.event_loop is uvloop but uvloop is not installed; using asyncio")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def prepare(settings: Settings) -> None:
    """Stop at once on what no retry can fix (credentials); create the topics.

    Raises ``StartupError``. Redis may be away at start: the worker runs without it.
    """
    await check_kafka(settings)
    client = open_redis(settings)
    try:
        await check_redis(client, settings)
    finally:
        await client.aclose()
    await ensure_topics(settings)
    k = settings.kafka
    auth = f", {k.mechanism} as {k.sasl_username}" if k.security_protocol.startswith("SASL") else ""
    log.info("starting: kafka %s (%s%s), redis %s, endpoints %s", k.bootstrap_servers,
             k.security_protocol, auth, redact_url(settings.redis.url.get_secret_value()),
             ", ".join(e.name for e in settings.endpoints))


def run_worker(settings: Settings,
               make_front: Callable[[CollectorRegistry], Front] | None = None) -> int:
    """Run until SIGINT/SIGTERM; return the exit code. Raises ``StartupError``.

    ``make_front``: a pipeline's front stage (``streams/pipelines/front.py``), given the
    worker's metrics registry; ``settings`` are then the pipeline's (``pipeline_settings``).
    """
    if settings.worker.gc_threshold:
        # Fewer cyclic-GC passes with thousands of requests in flight (see BENCHMARKS.md).
        gc.set_threshold(settings.worker.gc_threshold, 50, 100)
    asyncio.run(prepare(settings))
    loop = _new_loop(settings.worker.event_loop)
    asyncio.set_event_loop(loop)
    registry = CollectorRegistry()
    runtime = Runtime(settings, registry, make_front(registry) if make_front else None)
    app = build_app(settings, runtime)
    worker = faust.Worker(
        app, loop=loop, loglevel=settings.worker.log_level.lower(), quiet=True,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
