"""The worker's periodic probes (``Probes``): Redis for /readyz and the consumer lag gauge, each run by ``Every``.

Redis is pinged every second (``redis_ok``, one condition of readiness); the lag of each
assigned partition of the requests topic (end offset minus committed) is set every 5 seconds
on ``llm_streams_consumer_lag``. A probe that fails (not started yet, rebalancing, a server
away) is tried again next time.

Usage::

    probes = Probes(settings.topics.requests, metrics)
    stack.enter_context(probes.running(redis, lambda: runtime.app))
    probes.redis_ok
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import faust

from streams.intake.transport import committed_offsets
from streams.metrics import PipelineMetrics
from streams.redis_io import RedisClient, redis_answers

log = logging.getLogger("streams.worker")


class Probes:
    """Keeps ``redis_ok`` and ``llm_streams_consumer_lag`` current while ``running``."""

    def __init__(self, topic: str, metrics: PipelineMetrics) -> None:
        self._topic = topic
        self._metrics = metrics
        self.redis_ok = False
        self._lag_labels: set[tuple[str, str]] = set()

    @contextmanager
    def running(self, redis: RedisClient, app: Callable[[], faust.App | None]) -> Iterator[None]:
        """Both probes, from now until the block ends (``app``: the worker's app, once it has one)."""
        with (Every(lambda: self.probe_redis(redis), 1.0, "redis probe"),
              Every(lambda: self.update_lag(app()), 5.0, "consumer lag update")):
            yield

    async def probe_redis(self, redis: RedisClient) -> None:
        """Keeps ``redis_ok`` current for /readyz with a cheap PING."""
        self.redis_ok = False
        self.redis_ok = await redis_answers(redis)

    async def update_lag(self, app: faust.App | None) -> None:
        """Set llm_streams_consumer_lag per assigned partition: end offset minus committed.

        A partition with no commit yet counts from its earliest offset (the group starts
        there: ``auto_offset_reset=earliest``). Partitions no longer assigned are dropped.
        """
        if app is None:
            return
        consumer = app.consumer
        topic = self._topic
        tps = sorted(tp for tp in consumer.assignment() if tp.topic == topic)
        lags: dict[tuple[str, str], int] = {}
        if tps:
            ends = await consumer.highwaters(*tps)
            committed = committed_offsets(consumer)
            unknown = [tp for tp in tps if committed.get(tp) is None]
            starts = await consumer.earliest_offsets(*unknown) if unknown else {}
            for tp in tps:
                end = ends.get(tp)
                base = committed.get(tp)
                if base is None:
                    base = starts.get(tp)
                if end is not None and base is not None:
                    lags[(tp.topic, str(tp.partition))] = max(0, end - base)
        gauge = self._metrics.consumer_lag
        for labels in self._lag_labels - lags.keys():
            gauge.remove(*labels)
        for labels, lag in lags.items():
            gauge.labels(*labels).set(lag)
        self._lag_labels = set(lags)


class Every:
    """Runs ``job`` every ``interval`` seconds until closed; a failing run never stops it."""

    def __init__(self, job: Callable[[], Awaitable[None]], interval: float, what: str) -> None:
        self._job = job
        self._interval = interval
        self._what = what
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> Every:
        self._task = asyncio.create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._job(), timeout=self._interval * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not started yet, rebalancing, a server away: next time
                log.debug("%s failed: %s: %s", self._what, type(exc).__name__, exc)
            await asyncio.sleep(self._interval)
