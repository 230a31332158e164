"""The mock endpoint's routes and handlers (``MockLLM``): an OpenAI-compatible mock for demo, tests, benchmarks.

POST /v1/chat/completions answers deterministically from the prompt, with a usage block;
POST /v1/embeddings returns vectors derived from each input (``mockllm/embeddings.py``).
GET /stats returns counts (calls, statuses, distinct prompts, duplicate calls, the busiest
1-second window; with ``?log=1`` every call's time, status, fault and prompt, and the mock's
own stalls); POST /reset
clears them; POST /config changes behaviour at run time (JSON with any of latency_ms,
jitter_ms, error_rate, status_on_error, retry_after, down, faults, hang_seconds,
invalid_share, embed_input_ms, refuse_inputs).

A request with ``response_format`` (``json_schema`` or ``json_object``) gets a JSON answer
valid against the schema, derived from the prompt (``mockllm/structured.py``);
``invalid_share`` of them are invalid instead (not JSON, or breaking the schema).

``faults`` (a chaos mix), ``error_headers`` and the other behaviours are described in
``mockllm/faults.py``; the counts in ``mockllm/stats.py``. Their names are importable from here.

Usage::

    llm-streams mock-llm --port 8001 --latency-ms 50 --error-rate 0.1 --status-on-error 429
    llm-streams mock-llm --faults 500=0.2,429=0.1,hang=0.05,reset=0.05 --retry-after 1
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from mockllm.embeddings import handle_embeddings
from mockllm.faults import (
    BAD_USAGES,
    BODY_FAULTS,
    FAULT_KINDS,
    MockBehaviour,
    check_faults,
    check_headers,
    check_inputs,
    parse_faults,
    reset_connection,
)
from mockllm.stats import MockStats, max_in_window
from mockllm.structured import invalid_answer, response_schema, schema_answer

__all__ = [
    "BAD_USAGES", "BODY_FAULTS", "FAULT_KINDS", "MockBehaviour", "MockLLM", "MockStats",
    "check_faults", "check_headers", "check_inputs", "completion_body", "max_in_window",
    "parse_faults", "run_mock",
]

# A call's time is taken when the mock's loop gets to it: while the process is starved of CPU
# calls queue up and are stamped together. Such stalls (the loop late by more than
# STALL_SECONDS) are logged, so a test can tell "sent in a burst" from "seen in a burst".
STALL_TICK_SECONDS = 0.002
STALL_SECONDS = 0.01


def _prompt_text(body: dict[str, Any]) -> str:
    parts = []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        parts.append(content if isinstance(content, str) else orjson.dumps(content).decode())
    return "\n".join(parts)


def completion_body(model: str, prompt: str) -> dict[str, Any]:
    digest = hashlib.blake2b(prompt.encode(), digest_size=6).hexdigest()
    text = f"mock answer {digest}: {prompt[:48]}"
    prompt_tokens = max(1, len(prompt) // 4)
    completion_tokens = max(1, len(text) // 4)
    return {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class MockLLM:
    """The mock's state and handlers; ``app()`` builds the aiohttp application."""

    def __init__(self, behaviour: MockBehaviour, rng: random.Random | None = None) -> None:
        self.behaviour = behaviour
        self.stats = MockStats()
        self._rng = rng or random.Random()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        b = self.behaviour
        if "Authorization" in request.headers:
            self.stats.authorized += 1
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "request body is not JSON", now)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._error(400, "'messages' is required", now)
        prompt = _prompt_text(body)
        self.stats.prompts[prompt] += 1
        fault = self._draw_fault()
        cut = await self.cut_off(fault, request, now, prompt)
        if cut is not None:
            return cut
        delay = self.delay_ms()
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        if fault in BODY_FAULTS:
            self.stats.record(now, 200, prompt, fault)
            return self._hostile(fault, str(body.get("model", "mock")), prompt)
        if fault:
            status = int(fault)
            retry_after = (b.retry_after or 1.0) if status in (429, 503) else None
            return self._error(status, "mock fault", now, prompt, fault, retry_after)
        if b.down or (b.error_rate and self._rng.random() < b.error_rate):
            return self._error(b.status_on_error, "mock failure", now, prompt, "",
                               b.retry_after)
        self.stats.ok += 1
        self.stats.record(now, 200, prompt)
        payload = completion_body(str(body.get("model", "mock")), prompt)
        wants_json, schema = response_schema(body)
        if wants_json:
            payload["choices"][0]["message"]["content"] = self._structured(schema, prompt)
        payload["mock"] = {"latency_ms": max(0.0, delay)}  # the benchmark subtracts it per request
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    def _structured(self, schema: Any, prompt: str) -> str:
        """A schema-valid JSON answer, or (``invalid_share`` of calls) an invalid one."""
        share = self.behaviour.invalid_share
        if share and self._rng.random() < share:
            kind = "json" if self._rng.random() < 0.5 else "schema"
            self.stats.by_fault[f"invalid_{kind}"] += 1
            return invalid_answer(schema, prompt, kind)
        return orjson.dumps(schema_answer(schema, prompt)).decode()
    async def cut_off(self, fault: str, request: web.Request, now: float, prompt: str | None
                      ) -> web.StreamResponse | None:
        """The answer of a ``reset`` or ``hang`` fault (logged), else None."""
        if fault == "reset":
            self.stats.record(now, 0, prompt, fault)
            return reset_connection(request)
        if fault == "hang":
            self.stats.record(now, 0, prompt, fault)
            await asyncio.sleep(self.behaviour.hang_seconds)
            return web.Response(status=504)
        return None

    def delay_ms(self) -> float:
        """One call's latency: ``latency_ms`` plus jitter."""
        b = self.behaviour
        return b.latency_ms + (self._rng.uniform(-b.jitter_ms, b.jitter_ms) if b.jitter_ms else 0)

    def _draw_fault(self) -> str:
        mix = self.behaviour.faults
        if not mix:
            return ""
        r = self._rng.random()
        for kind, share in mix.items():
            if r < share:
                return kind
            r -= share
        return ""

    def _hostile(self, fault: str, model: str, prompt: str) -> web.Response:
        """A 200 that is not a well-formed chat completion (see ``BODY_FAULTS``)."""
        payload = completion_body(model, prompt)
        if fault == "not_json":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        if fault == "no_choices":
            del payload["choices"]
        elif fault == "bad_usage":
            payload["usage"] = self._rng.choice(BAD_USAGES)
        elif fault == "oversized":
            payload["choices"][0]["message"]["content"] = "x" * self.behaviour.oversize_bytes
        content_type = "text/html" if fault == "wrong_type" else "application/json"
        return web.Response(body=orjson.dumps(payload), content_type=content_type)

    def _error(self, status: int, message: str, now: float, prompt: str | None = None,
               fault: str = "", retry_after: float | None = None) -> web.Response:
        self.stats.record(now, status, prompt, fault, retry_after)
        headers = {}
        if self.behaviour.error_headers:
            headers = dict(self._rng.choice(self.behaviour.error_headers))
        elif retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        doc = {"error": {"message": message, "type": "mock_error", "code": status}}
        return web.Response(
            status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        with_log = request.query.get("log") == "1"
        return web.json_response(self.stats.summary(with_log), dumps=lambda o: orjson.dumps(o).decode())

    async def reset(self, request: web.Request) -> web.Response:
        self.stats = MockStats()
        return web.json_response({"reset": True})

    async def configure(self, request: web.Request) -> web.Response:
        changes = orjson.loads(await request.read() or b"{}")
        for key in changes:
            if not hasattr(self.behaviour, key):
                return web.json_response({"error": f"unknown key {key}"}, status=400)
        try:
            if "faults" in changes:
                changes["faults"] = check_faults(changes["faults"])
            if "error_headers" in changes:
                changes["error_headers"] = check_headers(changes["error_headers"])
            if "refuse_inputs" in changes:
                changes["refuse_inputs"] = check_inputs(changes["refuse_inputs"])
            if "batch_outcome" in changes:
                from mockllm.batches import check_outcome

                changes["batch_outcome"] = check_outcome(changes["batch_outcome"])
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        for key, value in changes.items():
            setattr(self.behaviour, key, value)
        return web.json_response(asdict(self.behaviour))

    async def _watch_stalls(self, app: web.Application) -> AsyncIterator[None]:
        async def watch() -> None:
            while True:
                before = time.time()
                await asyncio.sleep(STALL_TICK_SECONDS)
                late = time.time() - before - STALL_TICK_SECONDS
                if late > STALL_SECONDS:
                    due = before + STALL_TICK_SECONDS
                    self.stats.stalls.append((due, due + late))

        task = asyncio.get_running_loop().create_task(watch())
        yield
        task.cancel()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.cleanup_ctx.append(self._watch_stalls)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", functools.partial(handle_embeddings, self))
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/reset", self.reset)
        app.router.add_post("/config", self.configure)
        from mockllm.batches import BatchApi  # the Batch API: /v1/files, /v1/batches

        self.batches = BatchApi(self)
        self.batches.add_routes(app)
        return app


def run_mock(host: str, port: int, behaviour: MockBehaviour) -> None:
    """Serve until interrupted (the CLI's ``mock-llm``)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    web.run_app(
        MockLLM(behaviour).app(), host=host, port=port, access_log=None, print=None,
        backlog=4096,
        shutdown_timeout=2.0,  # calls held by the "hang" fault must not hold up a stop
    )
