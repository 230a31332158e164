"""An OpenAI-compatible mock endpoint for the demo, the tests and the benchmarks.

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

``faults`` is a chaos mix: the share of calls that fail each way, drawn per call, e.g.
``{"500": 0.2, "429": 0.1, "hang": 0.05, "reset": 0.05}``. A status fault answers with that
status (a 429 or 503 carries ``Retry-After: retry_after``, default 1 s); ``hang`` holds the
call for ``hang_seconds`` (past any client timeout); ``reset`` aborts the connection with a
TCP reset. Hostile answers, each a 200: ``bad_usage`` (a completion whose ``usage`` is
negative, fractional, a bool, a string, huge...), ``no_choices`` (JSON without ``choices``),
``not_json`` (an HTML page), ``wrong_type`` (a valid completion sent as ``text/html``),
``oversized`` (a valid completion of ``oversize_bytes``). ``error_headers``: a list of header
sets; each error answer sends one of them, drawn per call, instead of ``Retry-After`` (e.g.
``[{"Retry-After": "NaN"}, {"x-ratelimit-reset-tokens": "inf"}]``).

Usage::

    llm-streams mock-llm --port 8001 --latency-ms 50 --error-rate 0.1 --status-on-error 429
    llm-streams mock-llm --faults 500=0.2,429=0.1,hang=0.05,reset=0.05 --retry-after 1
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web

from mockllm.embeddings import handle_embeddings
from mockllm.structured import invalid_answer, response_schema, schema_answer


@dataclass
class MockBehaviour:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    status_on_error: int = 500
    retry_after: float | None = None
    down: bool = False  # answer every call with status_on_error
    faults: dict[str, float] = field(default_factory=dict)  # chaos mix, see the module doc
    hang_seconds: float = 300.0
    error_headers: list[dict[str, str]] = field(default_factory=list)  # one drawn per error
    oversize_bytes: int = 9 * 1_048_576
    # Share of structured (response_format) answers that are invalid: half not JSON, half
    # JSON breaking the schema (mockllm/structured.py); drawn per call.
    invalid_share: float = 0.0
    embed_input_ms: float = 0.0  # /v1/embeddings: cost per input on top of latency_ms per call
    refuse_inputs: list[str] = field(default_factory=list)  # /v1/embeddings answers 400 to these
    # The Batch API (mockllm/batches.py): time to complete, lines failing, how a batch ends.
    batch_delay_seconds: float = 2.0
    batch_error_rate: float = 0.0
    batch_outcome: str = "completed"  # or "failed", "expired"


FAULT_KINDS = ("hang", "reset")  # besides HTTP statuses "400".."599"
BODY_FAULTS = ("bad_usage", "no_choices", "not_json", "wrong_type", "oversized")
# Usage blocks no upstream should send: each must count as unknown, never fail an answer.
BAD_USAGES: tuple[object, ...] = (
    {"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": -2},
    {"prompt_tokens": 1.5, "completion_tokens": 2, "total_tokens": 3.5},
    {"prompt_tokens": True, "completion_tokens": False, "total_tokens": True},
    {"prompt_tokens": "12", "completion_tokens": "3", "total_tokens": "15"},
    {"prompt_tokens": 2**63 - 1, "completion_tokens": 2**63 - 1, "total_tokens": 2**63 - 1},
    {"prompt_tokens": None, "completion_tokens": [1], "total_tokens": {"n": 1}},
    "lots",
    [1, 2, 3],
)

_LOG_MAX = 1_000_000
# A call's time is taken when the mock's loop gets to it: while the process is starved of CPU
# calls queue up and are stamped together. Such stalls (the loop late by more than
# STALL_SECONDS) are logged, so a test can tell "sent in a burst" from "seen in a burst".
STALL_TICK_SECONDS = 0.002
STALL_SECONDS = 0.01


def check_faults(faults: object) -> dict[str, float]:
    """A valid chaos mix, or ValueError naming what is wrong."""
    if not isinstance(faults, dict):
        raise ValueError("faults must be an object of kind: share")
    for kind, share in faults.items():
        status_ok = kind.isdigit() and 400 <= int(kind) <= 599
        if not (status_ok or kind in FAULT_KINDS or kind in BODY_FAULTS):
            kinds = ", ".join((*FAULT_KINDS, *BODY_FAULTS))
            raise ValueError(f"unknown fault {kind!r}: an HTTP status 400-599 or one of {kinds}")
        if not isinstance(share, int | float) or share < 0:
            raise ValueError(f"fault {kind}: share must be a number >= 0")
    if sum(faults.values()) > 1:
        raise ValueError("fault shares add up to more than 1")
    return {k: float(v) for k, v in faults.items()}


def check_headers(sets: object) -> list[dict[str, str]]:
    """A valid ``error_headers``: a list of objects of string header values."""
    if not isinstance(sets, list) or not all(
        isinstance(h, dict) and all(isinstance(k, str) and isinstance(v, str)
                                    for k, v in h.items()) for h in sets):
        raise ValueError("error_headers must be a list of objects of header: string value")
    return sets


def check_inputs(inputs: object) -> list[str]:
    """A valid ``refuse_inputs``: a list of strings."""
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
        raise ValueError("refuse_inputs must be a list of strings")
    return inputs


@dataclass
class MockStats:
    calls: int = 0
    ok: int = 0
    authorized: int = 0  # calls that carried an Authorization header
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    by_fault: collections.Counter[str] = field(default_factory=collections.Counter)
    prompts: collections.Counter[str] = field(default_factory=collections.Counter)
    times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_LOG_MAX))
    statuses: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=_LOG_MAX))
    entries: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=_LOG_MAX))
    stalls: collections.deque[tuple[float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=_LOG_MAX))

    def record(self, when: float, status: int, prompt: str | None = None, fault: str = "",
               retry_after: float | None = None) -> None:
        """One call: status 0 when no HTTP answer was sent (hang, reset)."""
        self.calls += 1
        self.by_status[status] += 1
        if fault:
            self.by_fault[fault] += 1
        self.times.append(when)
        self.statuses.append(status)
        self.entries.append({"t": when, "status": status, "fault": fault,
                             "retry_after": retry_after, "prompt": prompt})

    def summary(self, with_log: bool = False) -> dict[str, Any]:
        """Counts; with_log adds every call's (time, status), the prompts called twice and
        ``calls``: each call's time (arrival), status, fault, Retry-After sent and prompt."""
        dup = sum(n - 1 for n in self.prompts.values() if n > 1)
        return {
            "calls": self.calls,
            "ok": self.ok,
            "authorized": self.authorized,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_fault": dict(self.by_fault),
            "distinct_prompts": len(self.prompts),
            "duplicate_calls": dup,
            "max_per_second": max_in_window(list(self.times), 1.0),
            "first_call": self.times[0] if self.times else None,
            "last_call": self.times[-1] if self.times else None,
            "stalls": len(self.stalls),
            **({"log": list(zip(self.times, self.statuses, strict=False)),
                "stalls_log": list(self.stalls),
                "duplicate_prompts": [p for p, n in self.prompts.items() if n > 1],
                "calls_log": list(self.entries)}
               if with_log else {}),
        }


def max_in_window(times: list[float], width: float) -> int:
    """The most of the sorted ``times`` within any window of ``width`` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


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
            return _reset(request)
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


def _reset(request: web.Request) -> web.StreamResponse:
    """Abort the connection with a TCP reset (SO_LINGER 0); nothing is sent back."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)  # never written: the connection is gone


def parse_faults(text: str) -> dict[str, float]:
    """``500=0.2,429=0.1,hang=0.05`` -> a checked chaos mix (the CLI's ``--faults``)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, share = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: expected KIND=SHARE")
        mix[kind.strip()] = float(share)
    return check_faults(mix)


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
