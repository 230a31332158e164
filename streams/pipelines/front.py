"""A pipeline's front stage: an event becomes a request, the validated answer an enriched event.

Plugged into the processor (``intake/front.py``), so an event takes the request path:
batch prefetch, cache, coalescing, idempotency, dispatch, dead letters, acks. What is
particular to pipelines happens here:

- ``parse``: the templates render the event into a ``Request`` (id, tenant, priority,
  messages, params with ``response_format``, deadline). A failed render raises
  ``TemplateFailed`` (dead letter ``template``, naming the field).
- ``answer``: runs inside the cache's coalescing, so only a valid answer is ever stored:
  the answer is checked against the schema; an invalid one is re-asked with the validator's
  errors up to ``output.repair`` times, then ``InvalidOutput`` (dead letter
  ``invalid_output``, with the errors and the last raw answer).
- ``record``: the event (a JSON object, with ``include_event``) plus ``{field: result,
  "_llm": {...}}``; the output keeps the event's key and headers.

With ``output.format: embedding`` the event renders ``prompt.input`` into an embedding request
(``kind: "embedding"``, batched across records by ``dispatch/embeddings.py``); there is no
answer to check, and the vector is the result (``_llm`` adds ``dimensions``, ``batch_size``).

Usage::

    front = PipelineFront(compile_pipeline(settings, "triage"), settings, registry)
"""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from streams.config import Settings
from streams.contract import USAGE_KEYS, CacheControl, Completion, Message, Request
from streams.errors import DispatchFailed, InvalidOutput, TemplateFailed, ValidationFailed
from streams.intake.front import Dispatch, Record
from streams.output.deadletters import original_headers
from streams.output.records import Headers
from streams.pipelines.compiled import CompiledPipeline
from streams.pipelines.metrics import PipelineStageMetrics
from streams.pipelines.schema import repair_messages
from streams.pipelines.templates import Template

RAW_ANSWER_CHARS = 2_000  # of the last answer, in an invalid_output dead letter
_ID_MAX = 256
_NO_CACHE_CONTROL = CacheControl()


def event_value(value: bytes) -> Any:
    """The event as templates see it: the parsed JSON value, else the UTF-8 text."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed("event value is neither JSON nor UTF-8 text") from None


def header_list(headers: Any) -> Headers | None:
    """A consumed record's headers as a list of (name, bytes) pairs, or None."""
    return original_headers(headers) or None


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def render_context(rec: Record, event: Any) -> dict[str, Any]:
    src = rec.source
    return {
        "event": event,
        "key": _text(rec.key),
        "headers": {k: _text(v) for k, v in header_list(rec.headers) or ()},
        "topic": src.topic, "partition": src.partition, "offset": src.offset,
        "timestamp": src.timestamp,
    }


def _sum_usage(usages: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(u[k] for u in usages) for k in USAGE_KEYS}


class PipelineFront:
    """See the module docstring. One per pipeline worker."""

    def __init__(self, pipe: CompiledPipeline, settings: Settings,
                 registry: CollectorRegistry) -> None:
        self.pipe = pipe
        self._max_bytes = settings.limits.max_value_bytes
        self._params = dict(pipe.cfg.params)
        fmt = pipe.response_format()
        if fmt is not None:
            self._params["response_format"] = fmt
        self.metrics = PipelineStageMetrics(registry).bind(pipe.name)
        self._constant: dict[tuple[str, str], Message] = {}

    # -- event -> request ---------------------------------------------------------------

    def parse(self, rec: Record) -> Request:
        self.metrics.events.inc()
        value = rec.value
        if value is None:
            raise ValidationFailed("record has no value (tombstone)")
        if len(value) > self._max_bytes:
            raise ValidationFailed(f"record value is {len(value)} bytes, over the "
                                   f"{self._max_bytes} limit")
        return self.request(render_context(rec, event_value(value)))

    def messages(self, ctx: dict[str, Any]) -> list[Message]:
        """The rendered chat messages; raises ``TemplateFailed``."""
        pipe = self.pipe
        assert pipe.user is not None  # settings.py: required unless the pipeline embeds
        out = []
        if pipe.system is not None:
            out.append(self._message("system", pipe.system, ctx))
        for user, assistant in pipe.few_shot:
            out.append(self._message("user", user, ctx))
            out.append(self._message("assistant", assistant, ctx))
        out.append(self._message("user", pipe.user, ctx))
        return out

    def _message(self, role: str, template: Template, ctx: dict[str, Any]) -> Message:
        """One message; a constant one (a system prompt without fields) is built once and
        shared (messages are frozen). Every field is checked at start or is rendered text:
        constructed without a second validation."""
        if template.constant:
            found = self._constant.get((role, template.source))
            if found is None:
                found = self._constant[(role, template.source)] = Message.model_construct(
                    role=role, content=template.source)
            return found
        return Message.model_construct(role=role, content=template.render(ctx))

    def request(self, ctx: dict[str, Any]) -> Request:
        """The request an event's context renders to; raises ``TemplateFailed``."""
        pipe, cfg = self.pipe, self.pipe.cfg
        rid = (pipe.id.render(ctx).strip() if pipe.id is not None
               else f"{ctx['topic']}-{ctx['partition']}-{ctx['offset']}")
        if not 0 < len(rid) <= _ID_MAX:
            raise TemplateFailed(f"id: rendered an id of {len(rid)} characters (1-{_ID_MAX})")
        try:
            text = self.input(ctx) if self.pipe.input is not None else None
            messages = None if text is not None else self.messages(ctx)
        except TemplateFailed as exc:
            exc.request_id = rid  # the dead letter's id
            raise
        tenant = pipe.tenant.render(ctx).strip() or None if pipe.tenant is not None else None
        deadline = None
        if cfg.deadline_ms is not None and ctx["timestamp"] > 0:
            deadline = ctx["timestamp"] + cfg.deadline_ms
        if tenant is not None and len(tenant) > _ID_MAX:
            raise TemplateFailed(f"tenant: rendered {len(tenant)} characters (at most {_ID_MAX})")
        # Every field is checked above or at start (model, params: settings.py), and rendered
        # text is always a string: constructed without a second validation (~15 us an event).
        return Request.model_construct(
            id=rid, messages=messages, input=text, model=cfg.model, params=self._params,
            priority=self._priority(ctx), tenant=tenant, cache=_NO_CACHE_CONTROL,
            deadline=deadline, metadata=None, kind="chat" if text is None else "embedding")

    def input(self, ctx: dict[str, Any]) -> str:
        """The rendered ``prompt.input`` (what is embedded); raises ``TemplateFailed``."""
        assert self.pipe.input is not None
        text = self.pipe.input.render(ctx)
        if not text:
            raise TemplateFailed("prompt.input: rendered an empty text (nothing to embed)")
        return text

    def _priority(self, ctx: dict[str, Any]) -> int:
        given = self.pipe.priority
        if isinstance(given, int):
            return given
        text = given.render(ctx).strip()
        if not (text.isdigit() and 0 <= int(text) <= 9):
            raise TemplateFailed(f"priority: rendered {text[:40]!r}, not an integer 0-9")
        return int(text)

    # -- answer, validated and repaired ---------------------------------------------------

    async def answer(self, req: Request, dispatch: Dispatch) -> Completion:
        if self.pipe.embeds:  # a vector: nothing to validate or repair
            return await dispatch(req)
        checker = self.pipe.checker
        comp = await dispatch(req)
        attempts, endpoints = comp.attempts, list(comp.endpoints)
        _, errors = checker.check(comp.output)
        repairs = 0
        usages: list[dict[str, int]] = []
        while errors:
            self.metrics.validation_failures.inc()
            if repairs >= self.pipe.cfg.output.repair:
                raw = comp.output
                raise DispatchFailed(InvalidOutput(
                    f"answer not valid after {repairs} repair(s): {errors[0]}", errors,
                    None if raw is None else raw[:RAW_ANSWER_CHARS]), attempts, endpoints)
            repairs += 1
            self.metrics.repairs_attempted.inc()
            usages.append(comp.usage)
            extra = [Message(**m) for m in repair_messages(comp.output, errors)]
            comp = await dispatch(req.model_copy(update={"messages": [*(req.messages or ()),
                                                                      *extra]}))
            attempts += comp.attempts
            endpoints += comp.endpoints
            _, errors = checker.check(comp.output)
            if not errors:
                self.metrics.repairs_succeeded.inc()
        body = comp.body
        if repairs:  # the answer cost every call: its usage says so (and is what is cached)
            body = {**body, "usage": _sum_usage(usages + [comp.usage])}
        return Completion(model=comp.model, body=body, endpoint=comp.endpoint,
                          attempts=attempts, endpoints=endpoints)

    # -- answer -> enriched event ---------------------------------------------------------

    def record(self, rec: Record, req: Request, comp: Completion, latency_ms: int,
               cost: dict[str, Any] | None) -> bytes:
        # A fresh answer was validated in ``answer``; a cached one (a hit, a coalesced
        # leader's) is checked again here, whoever stored it.
        if self.pipe.embeds:
            result = comp.body.get("embedding")
            if not isinstance(result, list | str):
                raise InvalidOutput("cached answer has no vector", ["no 'embedding'"], None)
        else:
            result, errors = self.pipe.checker.check(comp.output, validate=comp.cached)
            if errors:
                raise InvalidOutput(f"cached answer not valid: {errors[0]}", errors,
                                    (comp.output or "")[:RAW_ANSWER_CHARS])
        cfg = self.pipe.cfg.output
        out: dict[str, Any] = {}
        if cfg.include_event and rec.value is not None:
            event = event_value(rec.value)
            if isinstance(event, dict):
                out = event
        replaced = [k for k in (cfg.field, "_llm") if k in out]
        out[cfg.field] = result
        out["_llm"] = self.llm_info(req, comp, latency_ms, replaced, cost)
        return orjson.dumps(out)

    def llm_info(self, req: Request, comp: Completion, latency_ms: int,
                 replaced: list[str], cost: dict[str, Any] | None) -> dict[str, Any]:
        """The output's ``_llm`` field."""
        info: dict[str, Any] = {
            "id": req.id,
            "model": comp.model,
            "endpoint": None if comp.cached else comp.endpoint,
            "usage": comp.usage,
            "attempts": comp.attempts,
            "cached": comp.cached,
            "latency_ms": latency_ms,
            "prompt_version": self.pipe.prompt_version,
            "cost": cost,  # streams/pricing.py; None when the model has no price
        }
        if self.pipe.embeds:  # as on an embedding response record (streams/embedding.py)
            usage = comp.usage
            info["usage"] = {k: usage[k] for k in ("prompt_tokens", "total_tokens")}
            info["dimensions"] = comp.body.get("dimensions")
            info["batch_size"] = comp.body.get("batch_size")
        if replaced:
            info["replaced"] = replaced
        return info

    def headers(self, rec: Record) -> Headers | None:
        return header_list(rec.headers)

    def observe(self, rec: Record, outcome: str) -> None:
        self.metrics.observe(outcome, rec.source.timestamp)
