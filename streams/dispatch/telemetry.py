"""The dispatcher's metrics: per-request counters and histograms, and gauges read from its snapshot.

Usage::

    metrics = DispatchMetrics(registry, settings.endpoints)
    registry.register(StateCollector(dispatcher.snapshot))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streams.config import EndpointConfig
from streams.dispatch.cooldown import EndpointState

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
OUTCOMES = ("ok", "upstream", "exhausted", "expired", "no_endpoint", "too_large", "budget")


@dataclass(frozen=True, slots=True)
class DispatchSnapshot:
    """What the dispatcher is doing now (this worker's view): for gauges and the state dump."""

    depth: list[int]  # requests waiting, by priority 0..9
    inflight: dict[str, int]  # attempts in flight, by endpoint
    states: dict[str, EndpointState]  # by endpoint
    limits_degraded: bool  # Redis unreachable: limits enforced per worker
    waiting: int  # requests waiting for an endpoint


class DispatchMetrics:
    """Counters and histograms the dispatcher updates per request and attempt."""

    def __init__(self, registry: CollectorRegistry, endpoints: Iterable[EndpointConfig]) -> None:
        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["endpoint"], buckets=buckets, registry=registry)

        self.requests = counter("llm_streams_endpoint_requests", "Attempts sent to each endpoint",
                                ["endpoint"])
        self.errors = counter("llm_streams_endpoint_errors",
                              "Failed attempts by endpoint and error class", ["endpoint", "error"])
        self.latency = histogram("llm_streams_endpoint_latency_seconds",
                                 "Duration of each attempt (the upstream call)", _LATENCY_BUCKETS)
        self.wait = histogram(
            "llm_streams_limiter_wait_seconds",
            "Time a request waited for limits, cooldowns and capacity before an attempt",
            _WAIT_BUCKETS,
        )
        self.denied = counter("llm_streams_limiter_denied",
                              "Times a limit refused an endpoint to a request (which then waited)",
                              ["endpoint", "limit"])
        self.retries = counter("llm_streams_retries",
                               "Retries by the endpoint whose attempt failed and the reason",
                               ["endpoint", "reason"])
        self.outcomes = counter(
            "llm_streams_dispatch",
            "Finished dispatches by outcome (ok, upstream, exhausted, expired, no_endpoint, "
            "too_large)",
            ["outcome"],
        )
        # Children bound once: label lookups are not free on the per-request path.
        names = [e.name for e in endpoints]
        self.requests_by = {n: self.requests.labels(n) for n in names}
        self.latency_by = {n: self.latency.labels(n) for n in names}
        self.wait_by = {n: self.wait.labels(n) for n in names}
        self.outcome = {o: self.outcomes.labels(o) for o in OUTCOMES}


class StateCollector(Collector):
    """Gauges computed at scrape time from a snapshot (no per-request cost, never stale)."""

    def __init__(self, snapshot: Callable[[], DispatchSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(self._snapshot())

    def _families(self, snap: DispatchSnapshot | None = None) -> list[Metric]:
        depth = GaugeMetricFamily(
            "llm_streams_dispatcher_queue_depth",
            "Requests waiting in the dispatcher, by priority",
            labels=["priority"],
        )
        inflight = GaugeMetricFamily(
            "llm_streams_endpoint_inflight", "Attempts in flight per endpoint", labels=["endpoint"]
        )
        state = GaugeMetricFamily(
            "llm_streams_endpoint_state",
            "1 for the endpoint's current state (healthy, cooling, probing)",
            labels=["endpoint", "state"],
        )
        fallback = GaugeMetricFamily(
            "llm_streams_limiter_fallback",
            "1 while Redis is unreachable and limits are enforced per worker",
        )
        if snap is not None:
            for priority, n in enumerate(snap.depth):
                depth.add_metric([str(priority)], n)
            for name, current in snap.states.items():
                inflight.add_metric([name], snap.inflight[name])
                for s in EndpointState:
                    state.add_metric([name, s.value], 1.0 if s is current else 0.0)
            fallback.add_metric([], 1.0 if snap.limits_degraded else 0.0)
        return [depth, inflight, state, fallback]


_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_BATCH_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class EmbeddingMetrics:
    """Inputs by outcome, calls by endpoint and outcome, inputs per call, batch wait."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.inputs = Counter("llm_streams_embedding_inputs",
                              "Embedding inputs finished by the batcher, by outcome",
                              ["outcome"], registry=registry)
        self.calls = Counter("llm_streams_embedding_calls",
                             "/embeddings calls by endpoint and outcome (ok, retry, split, failed)",
                             ["endpoint", "outcome"], registry=registry)
        self.batch_inputs = Histogram("llm_streams_embedding_batch_inputs",
                                      "Inputs per /embeddings call", buckets=_SIZE_BUCKETS,
                                      registry=registry)
        self.batch_wait = Histogram("llm_streams_embedding_batch_wait_seconds",
                                    "From an input's arrival to the forming of its batch",
                                    buckets=_BATCH_WAIT_BUCKETS, registry=registry)
