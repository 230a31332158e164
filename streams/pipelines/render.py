"""``llm-streams pipeline render``: a pipeline's request for one event, and with ``--call`` its answer.

Prints the rendered messages and the chat-completion request that would be sent (for
``output.format: embedding``, the rendered input and its ``/embeddings`` request); with
``call`` it sends it to the first endpoint that serves the pipeline's model (directly, no
Kafka or Redis), validates and repairs the answer as the worker does, and prints the output
record the sink would get. A template error prints as the dead letter's message would.

Usage::

    llm-streams pipeline render triage --event '{"subject": "refund", "body": "..."}'
    llm-streams pipeline render triage --event @examples/tickets.jsonl --call
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from streams.config import EndpointConfig, Settings
from streams.contract import Completion, Request, Source, upstream_usage
from streams.dispatch.upstream import UpstreamClient
from streams.dispatch.vectors import read_vectors
from streams.embedding import embedding_body
from streams.errors import ConfigError, DispatchFailed, StreamsError
from streams.intake.processor import InRecord
from streams.pipelines.compiled import compile_pipeline, pipeline_settings
from streams.pipelines.front import PipelineFront
from streams.pricing import Pricing


def read_event(text: str) -> bytes:
    """``--event``: JSON text, or ``@path`` (a JSON file, or a JSONL file's first line)."""
    if not text.startswith("@"):
        return text.encode("utf-8")
    path = Path(text[1:])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read event file {path}: {exc.strerror}") from None
    if path.suffix == ".jsonl":
        raw = next((line for line in raw.splitlines() if line.strip()), b"")
    return raw.strip()


def request_body(req: Request) -> dict[str, Any]:
    """The body the dispatcher would send for ``req`` (an embedding batched with others)."""
    if req.kind == "embedding":
        return {**req.params, "model": req.model, "input": [req.input]}
    return {**req.params, "model": req.model, "messages": req.chat_messages()}


async def render(settings: Settings, name: str, event: bytes, call: bool) -> str:
    """The text the command prints; raises ``ConfigError`` for a broken pipeline."""
    pipe = compile_pipeline(settings, name)
    wsettings = pipeline_settings(settings, pipe.cfg)
    front = PipelineFront(pipe, wsettings, CollectorRegistry())
    now = int(time.time() * 1000)
    rec = InRecord(Source(pipe.cfg.source, 0, 0, now), None, event)
    lines = [f"pipeline {name} (prompt_version {pipe.prompt_version})"]
    try:
        req = front.parse(rec)
    except StreamsError as exc:
        return "\n".join([*lines, f"dead letter {exc.dlq_type}: {exc}"])
    if req.kind == "embedding":
        lines += ["--- input", str(req.input)]
    else:
        for m in req.chat_messages():
            lines += [f"--- {m['role']}", str(m["content"])]
    lines += ["--- request", orjson.dumps(
        {"id": req.id, "tenant": req.tenant, "priority": req.priority, "deadline": req.deadline,
         "body": request_body(req)}, option=orjson.OPT_INDENT_2).decode()]
    if call:
        lines += ["--- output", await _call(wsettings, front, rec, req)]
    return "\n".join(lines)


async def _call(settings: Settings, front: PipelineFront, rec: InRecord, req: Request) -> str:
    model = req.model or ""
    endpoint = next((e for e in settings.endpoints if e.serves(model)), None)
    if endpoint is None:
        raise ConfigError(f"no endpoint serves model {model}")
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session)

        async def dispatch(r: Request) -> Completion:
            try:
                if r.kind == "embedding":
                    body = await _embed(client, endpoint, model, r)
                else:
                    body = await client.complete(endpoint, model, r.chat_messages(), r.params)
            except StreamsError as exc:
                raise DispatchFailed(exc, 1, [endpoint.name]) from None
            return Completion(model, body, endpoint.name, 1, endpoints=[endpoint.name])

        try:
            comp = await front.answer(req, dispatch)
        except DispatchFailed as failed:
            details = f"\n{orjson.dumps(failed.error.details).decode()}" if failed.error.details else ""
            return f"dead letter {failed.error.dlq_type}: {failed.error}{details}"
    latency = int((time.monotonic() - started) * 1000)
    cost = Pricing(settings.pricing).of_completion(comp)
    value = front.record(rec, req, comp, latency, None if cost is None else cost.record())
    return orjson.dumps(orjson.loads(value),
                        option=orjson.OPT_INDENT_2).decode()


async def _embed(client: UpstreamClient, endpoint: EndpointConfig, model: str, req: Request
                 ) -> dict[str, Any]:
    """One ``/embeddings`` call for the request's input, kept as the worker keeps it."""
    body = await client.embed(endpoint, model, [req.input or ""], req.params)
    [(vector, dims)] = read_vectors(body, 1, endpoint=endpoint.name, status=200)
    usage = upstream_usage(body)
    tokens = (usage["total_tokens"] or usage["prompt_tokens"]) if usage else 0
    return embedding_body(vector, dims, tokens, 1)
