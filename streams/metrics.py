"""Prometheus metrics of the pipeline, and the worker's small HTTP server.

The registry is passed in, never the global one, so two workers in one process (tests) do not
interfere. Labels are bounded: topic, outcome, error type come from code and config; a
``model`` label (request-supplied) takes the configured models and at most
``MAX_MODEL_LABELS`` others, then ``other`` (``ModelLabels``).

Usage::

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    server = await start_http(registry, "127.0.0.1", 9300, ready=lambda: True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from streams.config import Settings
from streams.contract import Completion
from streams.intake.owner import HANDED_OVER
from streams.pricing import Cost
from streams.tenancy import CostMetrics, TenantLabels

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)


# Prometheus keeps every series for the life of the process, and a request may name any
# model: beyond the configured ones, this many distinct names get a label of their own
# (enough for a wildcard endpoint's real models), the rest share ``other``.
MAX_MODEL_LABELS = 64
OTHER = "other"


def configured_models(settings: Settings) -> set[str]:
    """The model names the config itself mentions (always labelled by name)."""
    return {settings.worker.default_model, *(m for e in settings.endpoints for m in e.models or ())}


class ModelLabels:
    """Maps a model name to a bounded label value: itself, or ``other`` beyond the cap."""

    def __init__(self, known: Iterable[str] = (), cap: int = MAX_MODEL_LABELS) -> None:
        self._named = set(known)
        self._room = cap

    def __call__(self, model: str) -> str:
        if model in self._named:
            return model
        if self._room > 0:
            self._room -= 1
            self._named.add(model)
            return model
        return OTHER


class PipelineMetrics:
    """Counters and gauges of the consume -> answer -> publish pipeline.

    ``models``: names that always get their own ``model`` label (``configured_models``).
    """

    def __init__(self, registry: CollectorRegistry, models: Iterable[str] = (),
                 tenants: Iterable[str] = ()) -> None:
        self.model_label = ModelLabels(models)
        self.costs = CostMetrics(registry, TenantLabels(tenants))  # tenancy.py
        counter = partial(Counter, registry=registry)
        gauge = partial(Gauge, registry=registry)
        self.consumed = counter("llm_streams_records_consumed", "Request records consumed", ["topic"])
        self.outputs = counter(
            "llm_streams_outputs",
            "Output records published, by outcome (ok, cached, replayed) or dead-letter type",
            ["outcome"],
        )
        self.dead_letters = counter(
            "llm_streams_dead_letters", "Dead letters published by error type", ["type"]
        )
        self.latency = Histogram(
            "llm_streams_end_to_end_seconds",
            "From the request record's timestamp to its output's publish",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = gauge("llm_streams_in_flight", "Requests consumed and not yet answered")
        self.publish_errors = counter(
            "llm_streams_publish_errors", "Failed attempts to publish an output record"
        )
        self.tokens = counter(
            "llm_streams_tokens", "Tokens reported by upstream usage", ["model", "kind"]
        )
        self.consumer_lag = gauge(
            "llm_streams_consumer_lag", "Records behind the partition's end offset", ["topic", "partition"]
        )
        self.assigned_partitions = gauge(
            "llm_streams_assigned_partitions", "Partitions of the requests topic assigned to this worker"
        )
        self.skipped_finished = counter(
            "llm_streams_records_skipped_finished",
            "Records not redone after a crash or rebalance: the commit's metadata names them "
            "finished (their output was published)",
            ["topic"],
        )
        self.handed_over = counter(
            "llm_streams_answers_handed_over",
            "Answers not published here: their partition went to another worker during the "
            "call, which publishes them from the idempotency store",
        )
        self.loop_stalls = Histogram(
            "llm_streams_event_loop_stall_seconds",
            "Stalls of the worker's event loop (a 20 ms timer fired 50 ms or more late)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.gc_seconds = counter(
            "llm_streams_gc_seconds", "Time the worker spent in Python's garbage collection"
        )
        # labelled children by label values: ``labels()`` costs ~1.5 us a call, and every
        # answer takes four (outputs, latency, prompt and completion tokens)
        self._outputs: dict[str, Any] = {}
        self._latency: dict[str, Any] = {}
        self._tokens: dict[str, tuple[Any, Any]] = {}

    def answered(self, outcome: str, latency_seconds: float) -> None:
        """One published answer: ``outputs`` and ``latency`` under ``outcome``."""
        self.output(outcome)
        hist = self._latency.get(outcome)
        if hist is None:
            hist = self._latency[outcome] = self.latency.labels(outcome)
        hist.observe(latency_seconds)

    def published(self, tenant: str | None, comp: Completion, cost: Cost | None,
                  latency_seconds: float) -> str:
        """The metrics of a published answer (outputs, latency, tokens, cost); its outcome."""
        outcome = "cached" if comp.cached else "ok"
        self.answered(outcome, latency_seconds)
        usage = comp.usage
        if not comp.cached:
            self.count_tokens(comp.model, usage)
        self.costs.count(tenant, self.model_label(comp.model), cost, comp.cached, usage)
        return outcome

    def handed_over_answer(self, tenant: str | None, comp: Completion, cost: Cost | None) -> str:
        """An answer left to its partition's new owner to publish (``intake/owner.py``): paid
        here, so its tokens and cost count here, but not as an output; its outcome."""
        self.handed_over.inc()
        self.count_tokens(comp.model, comp.usage)
        self.costs.count(tenant, self.model_label(comp.model), cost, comp.cached, comp.usage)
        return HANDED_OVER

    def output(self, outcome: str) -> None:
        """One output record under ``outcome`` (replayed, a dead letter's type...)."""
        counter = self._outputs.get(outcome)
        if counter is None:
            counter = self._outputs[outcome] = self.outputs.labels(outcome)
        counter.inc()

    def count_tokens(self, model: str, usage: Mapping[str, int]) -> None:
        """Add an answer's validated usage (``Completion.usage``) under a bounded label."""
        label = self.model_label(model)
        pair = self._tokens.get(label)
        if pair is None:
            pair = self._tokens[label] = (self.tokens.labels(label, "prompt"),
                                          self.tokens.labels(label, "completion"))
        pair[0].inc(usage["prompt_tokens"])
        pair[1].inc(usage["completion_tokens"])


async def start_http(
    registry: CollectorRegistry, host: str, port: int, ready: Callable[[], bool]
) -> web.AppRunner:
    """Serve /metrics, /healthz and /readyz until the returned runner is cleaned up."""

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
