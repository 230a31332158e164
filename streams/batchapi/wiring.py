"""The parts of work that can wait, built for the worker's runtime (one call, one context).

Usage::

    parking = await stack.enter_async_context(
        batch_parts(settings, publisher, dispatcher, cache, metrics, registry, session))
    processor = Processor(..., parking=parking)   # None when batch_api is off
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from prometheus_client import CollectorRegistry

from streams.batchapi.client import BatchClient
from streams.batchapi.coordinator import Coordinator
from streams.batchapi.jobs import JobStore, ensure_batch_topics
from streams.batchapi.metrics import BatchMetrics
from streams.batchapi.parking import Parking
from streams.batchapi.policy import BatchPolicy
from streams.batchapi.repeats import BatchCache
from streams.batchapi.runner import CutRunner, RunnerDeps
from streams.config import Settings
from streams.intake.processor import Answerer, Processor
from streams.kafka_io import start_producer
from streams.metrics import PipelineMetrics
from streams.output.deadletters import DeadLetters
from streams.output.records import Publisher
from streams.pricing import Pricing


@asynccontextmanager
async def batch_parts(
    settings: Settings,
    publisher: Publisher,
    dispatcher: Answerer,
    cache: BatchCache,
    metrics: PipelineMetrics,
    registry: CollectorRegistry,
    session: aiohttp.ClientSession,
) -> AsyncIterator[Parking | None]:
    """The processor's parking hook and the running coordinator; None when batch_api is off.

    The metrics are registered either way (the dashboard reads them).
    """
    batch_metrics = BatchMetrics(registry)
    policy = BatchPolicy(settings, batch_metrics)
    if not policy.enabled:
        yield None
        return
    await ensure_batch_topics(settings)
    producer = await start_producer(settings)
    try:
        store = JobStore(settings, producer)
        # The normal path for parked requests: the same processor, without parking.
        plain = Processor(settings, publisher, dispatcher, cache, metrics)  # type: ignore[arg-type]
        deps = RunnerDeps(settings, policy, BatchClient(session), store, cache, publisher,
                          DeadLetters(settings, publisher, metrics), batch_metrics,
                          pricing=Pricing(settings.pricing), costs=metrics.costs,
                          model_label=metrics.model_label)
        async with Coordinator(settings, store, CutRunner(deps), plain, batch_metrics):
            yield Parking(settings, policy, publisher, batch_metrics)
    finally:
        await producer.stop()
