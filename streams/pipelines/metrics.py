"""Per-pipeline metrics: events in, outputs and dead letters by type, repairs, validation, latency.

Labelled by pipeline name (bounded: names come from the config). The registry is passed in.

Usage::

    m = PipelineStageMetrics(registry).bind("triage")
    m.events.inc(); m.observe("ok", source_timestamp_ms)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DEAD_LETTER = "dead_letter_"


class PipelineStageMetrics:
    """The metric families; ``bind(name)`` gives one pipeline's children."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("llm_streams_pipeline_events", "Events consumed by a pipeline",
                              ["pipeline"], registry=registry)
        self.outputs = Counter(
            "llm_streams_pipeline_outputs",
            "A pipeline's finished events by outcome (ok, cached, replayed, dead_letter_<type>)",
            ["pipeline", "outcome"], registry=registry)
        self.dead_letters = Counter("llm_streams_pipeline_dead_letters",
                                    "A pipeline's dead letters by type", ["pipeline", "type"],
                                    registry=registry)
        self.repairs = Counter("llm_streams_pipeline_repairs",
                               "Repair re-asks of a pipeline, attempted and succeeded",
                               ["pipeline", "result"], registry=registry)
        self.validation_failures = Counter(
            "llm_streams_pipeline_validation_failures",
            "Answers that failed a pipeline's output schema (before or after a repair)",
            ["pipeline"], registry=registry)
        self.latency = Histogram("llm_streams_pipeline_latency_seconds",
                                 "From the event's timestamp to its output's publish",
                                 ["pipeline"], buckets=_BUCKETS, registry=registry)

    def bind(self, name: str, clock: Callable[[], float] = time.time) -> BoundMetrics:
        return BoundMetrics(self, name, clock)


class BoundMetrics:
    """One pipeline's metrics."""

    def __init__(self, fam: PipelineStageMetrics, name: str, clock: Callable[[], float]) -> None:
        self._fam = fam
        self._name = name
        self._clock = clock
        self._outcomes: dict[str, Counter] = {}
        self.events = fam.events.labels(name)
        self.repairs_attempted = fam.repairs.labels(name, "attempted")
        self.repairs_succeeded = fam.repairs.labels(name, "succeeded")
        self.validation_failures = fam.validation_failures.labels(name)
        self._latency = fam.latency.labels(name)

    def observe(self, outcome: str, timestamp_ms: int) -> None:
        """One event finished with ``outcome``; its latency from ``timestamp_ms``."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self._fam.outputs.labels(self._name, outcome)
        counter.inc()
        if outcome.startswith(DEAD_LETTER):
            self._fam.dead_letters.labels(self._name, outcome.removeprefix(DEAD_LETTER)).inc()
        elif timestamp_ms > 0:
            self._latency.observe(max(0.0, self._clock() - timestamp_ms / 1000.0))
