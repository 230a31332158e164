"""One cut from its requests to their outputs: build, upload, create, poll, download, answer.

Each step is written to the job store before the next begins, so a replacement resumes
where a killed coordinator stopped: a part with a batch id is polled, not created again; a
part with a file but no batch id looks for a batch created with its tag in ``metadata``
before creating one. Identical requests (same cache key) share one line and are all
answered from it. A line that failed (or is missing) sends its requests down the normal
path, which retries or dead-letters them by the usual rules; a job that failed, expired or
was cancelled sends all its requests there. Answers are stored in the response cache and
the idempotency store before they are published; a request already answered by a normal
call (its deadline came first) gets no second output.

A request delivered twice (a producer's retry; a redelivery parked again after a crash
between parking and the source's commit) is paid once: a new cut first republishes the
remembered output of a request already answered, and a request whose first delivery sits
in a line of a cut still running rides on that line (``PartitionJobs.lines``) instead of
getting one of its own.

Usage::

    runner = CutRunner(deps)
    task = asyncio.create_task(runner.run(partition_jobs, active_cut))
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.batchapi.client import DONE_STATES, BatchApiError, BatchClient
from streams.batchapi.jobs import JobStore, Part
from streams.batchapi.lines import Result, input_file, read_results
from streams.batchapi.metrics import BatchMetrics
from streams.batchapi.partition import ActiveCut, Held, PartitionJobs
from streams.batchapi.policy import BatchPolicy
from streams.batchapi.repeats import CHUNK, BatchCache, Repeats
from streams.cache.codec import cached_completion
from streams.config import EndpointConfig, Settings
from streams.contract import Completion, Request, response_record
from streams.output.deadletters import DeadLetters
from streams.output.records import OutRecord, Publisher
from streams.pricing import Cost, Pricing
from streams.tenancy import CostMetrics

log = logging.getLogger("streams.batchapi")

META_KEY = "llm_streams_job"  # the part's tag in the batch's metadata
SUBMIT_TRIES = 3


@dataclass(slots=True)
class RunnerDeps:
    settings: Settings
    policy: BatchPolicy
    client: BatchClient
    store: JobStore
    cache: BatchCache
    publisher: Publisher
    letters: DeadLetters
    metrics: BatchMetrics
    pricing: Pricing | None = None  # the batch price (``pricing.<model>.batch_discount``)
    costs: CostMetrics | None = None  # the tenants' cost counters, as for normal answers
    model_label: Callable[[str], str] = str  # bounded model labels (``PipelineMetrics``)
    clock: Callable[[], float] = time.time


class CutRunner:
    """See the module docstring."""

    def __init__(self, deps: RunnerDeps) -> None:
        self._d = deps
        self._poll = deps.settings.batch_api.poll_seconds
        self._endpoints = {e.name: e for e in deps.settings.endpoints}
        self._repeats = Repeats(deps.settings, deps.cache, deps.publisher)

    async def run(self, pj: PartitionJobs, active: ActiveCut) -> None:
        """Run the cut to its end; the partition's requests are settled as they are answered."""
        cut, d = active.cut, self._d
        if not cut.parts:  # a new cut: what was answered already is only republished
            await self._repeats.replay_answered(pj, active)
        lines = self._lines(pj, active)
        try:
            await self._run_lines(pj, active, lines)
        except asyncio.CancelledError:  # a stop or a revoked partition: all is read again
            self._repeats.close(pj, lines)
            raise
        except BaseException:
            self._repeats.abandon(pj, active, lines)  # resumed by the coordinator
            raise
        self._repeats.close(pj, lines)
        await self._repeats.settled(pj, active, self._poll)  # a done cut is skipped on restart
        cut.done = True
        await d.store.save(cut)

    async def _run_lines(self, pj: PartitionJobs, active: ActiveCut,
                         lines: dict[tuple[str, str], dict[str, list[Held]]]) -> None:
        cut, d = active.cut, self._d
        log.debug("cut %s: %d requests held, parts %s", cut.key, len(active.held),
                  [(p.tag, p.state, p.batch_id) for p in cut.parts])
        if not cut.parts:  # a new cut: its parts, written before anything is uploaded
            cut.parts = [Part(endpoint, model, len(by_key)) for (endpoint, model), by_key
                         in sorted(lines.items())]
            for part in cut.parts:
                d.metrics.requests_per_job.observe(
                    sum(len(hs) for hs in lines[(part.endpoint, part.model)].values()))
            await d.store.save(cut)
        waiting = []
        for part in cut.parts:
            by_key = lines.get((part.endpoint, part.model), {})
            endpoint = self._endpoints.get(part.endpoint)
            if not by_key:
                continue  # every request of it answered and committed before a restart
            if part.state == "failed":  # failed before a restart: normal path again
                await self._to_normal(pj, by_key, "job_failed", part, "failed")
            elif endpoint is None:
                await self._to_normal(pj, by_key, "no_endpoint", part, "failed")
            elif part.batch_id is None and not await self._submit(pj, active, part, endpoint,
                                                                   by_key):
                await self._to_normal(pj, by_key, "submit_failed", part, "failed")
            else:
                waiting.append((part, endpoint, by_key))
        await asyncio.gather(*(self._follow(pj, active, p, e, k) for p, e, k in waiting))

    def _lines(self, pj: PartitionJobs, active: ActiveCut
               ) -> dict[tuple[str, str], dict[str, list[Held]]]:
        """(endpoint, model) -> custom id -> the requests of that line (those of one
        ``Repeats.ident`` share it)."""
        out: dict[tuple[str, str], dict[str, list[Held]]] = {}
        by_ident: dict[tuple[str, str], dict[tuple[str, ...], str]] = {}
        stored = {p.model: p.endpoint for p in active.cut.parts}
        invalid = []
        for held in active.held:
            if held.rec.offset in pj.handled:
                continue  # answered by a normal call already (its deadline came)
            req = held.req
            if req is None or req.model is None:
                invalid.append(held)
                continue
            endpoint = stored.get(req.model)
            if endpoint is None and not active.cut.parts:
                chosen = self._d.policy.endpoint_for(req.model)
                endpoint = chosen.name if chosen is not None else None
            if endpoint is None:
                invalid.append(held)
                continue
            tag = (endpoint, req.model)
            if self._repeats.ride(pj, active, held, out.get(tag, {})):
                continue  # on its first delivery's line, in a cut still running
            ident = self._repeats.ident(held)
            cid = by_ident.setdefault(tag, {}).setdefault(ident, str(held.rec.offset))
            helds = out.setdefault(tag, {}).setdefault(cid, [])
            helds.append(held)
            self._repeats.offer(pj, held, helds)
        if invalid:
            pj.handled.update(h.rec.offset for h in invalid)
            self._normal(pj, invalid, "no_endpoint")
        return out

    async def _submit(self, pj: PartitionJobs, active: ActiveCut, part: Part,
                      endpoint: EndpointConfig, by_key: dict[str, list[Held]]) -> bool:
        d, cut = self._d, active.cut
        tag = f"{cut.key}/{part.tag}"
        for attempt in range(SUBMIT_TRIES):
            try:
                if part.file_id is not None:  # uploaded before a restart: created already?
                    found = await d.client.find(endpoint, META_KEY, tag)
                    if found is not None and isinstance(found.get("id"), str):
                        part.batch_id = found["id"]
                        part.submitted_at = part.submitted_at or _iso(d.clock())
                        part.state = "submitted"
                        await d.store.save(cut)
                        return True
                else:
                    data = input_file(
                        (cid, part.model, hs[0].req.chat_messages(), hs[0].req.params)
                        for cid, hs in by_key.items() if hs[0].req is not None)
                    part.file_id = await d.client.upload(endpoint, data)
                    await d.store.save(cut)
                batch = await d.client.create(endpoint, part.file_id, {META_KEY: tag})
                part.batch_id = str(batch["id"])
                part.submitted_at = _iso(d.clock())
                part.state = "submitted"
                await d.store.save(cut)
                log.info("batch %s submitted to %s: %d lines of partition %d offsets %d-%d",
                         part.batch_id, part.endpoint, len(by_key), cut.partition, cut.start,
                         cut.end - 1)
                return True
            except (BatchApiError, KeyError) as exc:
                log.warning("batch job for %s (try %d of %d) failed: %s", tag, attempt + 1,
                            SUBMIT_TRIES, exc)
                await asyncio.sleep(self._poll)
        return False

    async def _follow(self, pj: PartitionJobs, active: ActiveCut, part: Part,
                      endpoint: EndpointConfig, by_key: dict[str, list[Held]]) -> None:
        """Poll the batch until it ends; then answer its requests."""
        d = self._d
        assert part.batch_id is not None
        while True:
            try:
                batch = await d.client.retrieve(endpoint, part.batch_id)
            except BatchApiError as exc:
                log.warning("batch %s: poll failed: %s", part.batch_id, exc)
                batch = {"status": "failed"} if exc.status == 404 else {}  # gone
            status = batch.get("status")
            log.debug("batch %s: %s", part.batch_id, status)
            if status in DONE_STATES:
                break
            await asyncio.sleep(self._poll)
        results: dict[str, Result] = {}
        if status == "completed":
            try:
                for fid in (batch.get("output_file_id"), batch.get("error_file_id")):
                    if isinstance(fid, str) and fid:
                        results.update(read_results(await d.client.content(endpoint, fid)))
            except BatchApiError as exc:
                log.warning("batch %s: results unreadable (%s); normal path", part.batch_id, exc)
                status = "failed"
        if status != "completed":
            log.warning("batch %s ended %s: its requests take the normal path", part.batch_id,
                        status)
            await self._to_normal(pj, by_key, "job_failed", part, "failed")
            return
        await self._answer(pj, part, by_key, results)
        part.state = "completed"
        d.metrics.jobs_finished.labels("completed").inc()

    async def _answer(self, pj: PartitionJobs, part: Part, by_key: dict[str, list[Held]],
                      results: dict[str, Result]) -> None:
        self._repeats.close(pj, {part.tag: by_key})
        failed: list[Held] = []
        ready: list[tuple[Held, Completion]] = []
        for cid, helds in by_key.items():
            result = results.get(cid)
            late = sum(1 for h in helds if h.rec.offset in pj.handled)
            if late and result is not None and result.ok:
                self._d.metrics.late_dropped.inc(late)
            live = [h for h in helds if h.rec.offset in pj.open and h.rec.offset not in pj.handled]
            if result is None or result.body is None:
                failed += live
                continue
            comp = Completion(part.model, result.body, part.endpoint, 1, endpoints=[part.endpoint])
            shared = cached_completion(result.body, part.model)  # paid once: by live[0]
            ready += [(h, comp if i == 0 else shared) for i, h in enumerate(live)]
        if failed:
            pj.handled.update(h.rec.offset for h in failed)
            self._normal(pj, failed, "line_error")
        for i in range(0, len(ready), CHUNK):
            await self._publish(pj, part, ready[i:i + CHUNK])

    async def _publish(self, pj: PartitionJobs, part: Part,
                       chunk: list[tuple[Held, Completion]]) -> None:
        d = self._d
        reqs = [h.req for h, _ in chunk if h.req is not None]
        found = await d.cache.prefetch(reqs, [h.rec.source.topic for h, _ in chunk])
        out: list[OutRecord] = []
        writes: list[Coroutine[Any, Any, object]] = []
        stored: set[str] = set()
        responses = d.settings.topics.responses
        for (held, comp), got in zip(chunk, found, strict=True):
            req = held.req
            assert req is not None
            if got.recalled is not None and got.recalled.kind == "response":
                out.append(OutRecord(responses, held.rec.key, got.recalled.value))
                continue  # answered before a restart: republished as it was
            cost = batch_cost(d.pricing, d.metrics, comp, part.endpoint)
            value = self._record(held, req, comp, part, cost)
            if got.key not in stored and not req.cache.no_store:
                # the line's answer once per cache key, whichever of its requests may store it
                # (a shared one is published as cached, but its body is the line's fresh answer)
                stored.add(got.key)
                fresh = Completion(part.model, comp.body, part.endpoint, 1, endpoints=[part.endpoint])
                writes.append(d.cache.store(req, fresh, got.key))
            writes.append(d.cache.remember(got.ref, value))
            out.append(OutRecord(responses, held.rec.key, value))
            d.metrics.answered.inc()
            if d.costs is not None:
                d.costs.count(req.tenant, d.model_label(comp.model), cost, comp.cached, comp.usage)
        await asyncio.gather(*writes)  # remembered before published, as in the processor
        refused = await d.publisher.publish_many(out)
        for (held, _), too_large in zip(chunk, refused, strict=True):
            if too_large is not None:
                await d.letters.write(held.rec, too_large, held.req, None, 1, [part.endpoint])
            pj.settle(held.rec.offset)

    def _record(self, held: Held, req: Request, comp: Completion, part: Part,
                cost: Cost | None) -> bytes:
        latency = max(0, int(self._d.clock() * 1000) - held.rec.source.timestamp)
        value = response_record(req, comp, latency_ms=latency,
                                cost=None if cost is None else cost.record())
        doc: dict[str, Any] = orjson.loads(value)
        doc["batch_job"] = {"id": part.batch_id, "submitted_at": part.submitted_at}
        return orjson.dumps(doc)

    async def _to_normal(self, pj: PartitionJobs, by_key: dict[str, list[Held]], reason: str,
                         part: Part, state: str) -> None:
        self._repeats.close(pj, {part.tag: by_key})
        helds = [h for hs in by_key.values() for h in hs
                 if h.rec.offset in pj.open and h.rec.offset not in pj.handled]
        pj.handled.update(h.rec.offset for h in helds)
        part.state = state
        self._d.metrics.jobs_finished.labels(state).inc()
        if helds:
            self._normal(pj, helds, reason)

    def _normal(self, pj: PartitionJobs, helds: list[Held], reason: str) -> None:
        pj.normal(helds, reason)


def batch_cost(pricing: Pricing | None, metrics: BatchMetrics, comp: Completion, endpoint: str
               ) -> Cost | None:
    """The batch price of an answer (None without a price), and what batching saved counted;
    for a line's answer shared (``cached``), that price as saved: it was paid once."""
    if pricing is None:
        return None
    usage = comp.body.get("usage") if isinstance(comp.body, dict) else None
    usage = usage if isinstance(usage, dict) else None
    cost = pricing.price(comp.model, endpoint, usage, batch=True)
    if comp.cached:
        return None if cost is None else cost.as_saved()
    normal = pricing.price(comp.model, endpoint, usage)
    if cost is not None and normal is not None and normal.total > cost.total:
        metrics.cost_saved.inc(normal.total - cost.total)
    return cost


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
