"""The mock's Batch API: ``/v1/files`` (upload, content) and ``/v1/batches`` (create, retrieve,
cancel, list), OpenAI style.

A batch is ``in_progress`` for ``batch_delay_seconds`` after it is created, then ends with
``batch_outcome`` (``completed``, ``failed`` or ``expired``). When completed, each input line is
answered as ``/v1/chat/completions`` would answer it (same deterministic text and usage), except
a share ``batch_error_rate`` of lines, which go to the error file with a 500. Lines answered
in batches are not chat calls: they are counted in ``GET /batch-stats`` (files, batches created
and cancelled, lines answered and failed), never in ``/stats``.

Usage::

    BatchApi(mock).add_routes(app)   # mock: a MockLLM, whose behaviour holds the settings
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from mockllm.server import _prompt_text, completion_body


class _Mock(Protocol):
    behaviour: Any


@dataclass
class _Batch:
    doc: dict[str, Any]
    due: float
    lines: list[bytes] = field(default_factory=list)


OUTCOMES = ("completed", "failed", "expired")


def check_outcome(value: object) -> str:
    """A valid ``batch_outcome``, or ValueError naming the choices."""
    if value not in OUTCOMES:
        raise ValueError(f"batch_outcome must be one of {', '.join(OUTCOMES)}")
    return str(value)


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class BatchApi:
    """See the module docstring."""

    def __init__(self, mock: _Mock, rng: Any = None) -> None:
        import random

        self._mock = mock
        self._rng = rng or random.Random()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.stats = {"files": 0, "batches_created": 0, "batches_cancelled": 0,
                      "lines_answered": 0, "lines_failed": 0, "retrieves": 0}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{id}/content", self.content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list)
        app.router.add_get("/v1/batches/{id}", self.retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self.cancel)
        app.router.add_get("/batch-stats", self.get_stats)

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        part = form.get("file")
        if not isinstance(part, web.FileField) or form.get("purpose") != "batch":
            return _error(400, "multipart 'file' and purpose=batch are required")
        data = part.file.read()
        fid = _id("file")
        self.files[fid] = data
        self.stats["files"] += 1
        return web.json_response({"id": fid, "object": "file", "bytes": len(data),
                                  "created_at": int(time.time()), "purpose": "batch",
                                  "filename": part.filename})

    async def content(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["id"])
        if data is None:
            return _error(404, "no such file")
        return web.Response(body=data, content_type="application/jsonl")

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "request body is not JSON")
        fid = body.get("input_file_id") if isinstance(body, dict) else None
        if not isinstance(fid, str) or fid not in self.files:
            return _error(400, "input_file_id names no uploaded file")
        b = self._mock.behaviour
        now = time.time()
        bid = _id("batch")
        lines = [ln for ln in self.files[fid].splitlines() if ln.strip()]
        doc = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"),
               "input_file_id": fid, "completion_window": body.get("completion_window"),
               "status": "in_progress", "created_at": int(now), "output_file_id": None,
               "error_file_id": None, "metadata": body.get("metadata"),
               "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        self.batches[bid] = _Batch(doc, now + float(b.batch_delay_seconds), lines)
        self.stats["batches_created"] += 1
        return web.json_response(doc)

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "no such batch")
        self.stats["retrieves"] += 1
        self._settle(batch)
        return web.json_response(batch.doc)

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "no such batch")
        self._settle(batch)
        if batch.doc["status"] == "in_progress":
            batch.doc["status"] = "cancelled"
            self.stats["batches_cancelled"] += 1
        return web.json_response(batch.doc)

    async def list(self, request: web.Request) -> web.Response:
        docs = [b.doc for b in reversed(self.batches.values())]
        limit = int(request.query.get("limit", "20"))
        return web.json_response({"object": "list", "data": docs[:limit],
                                  "has_more": len(docs) > limit})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    def _settle(self, batch: _Batch) -> None:
        """End the batch once it is due: answer its lines, write its files."""
        doc = batch.doc
        if doc["status"] != "in_progress" or time.time() < batch.due:
            return
        b = self._mock.behaviour
        if b.batch_outcome != "completed":
            doc["status"] = b.batch_outcome
            return
        out, errors = [], []
        for raw in batch.lines:
            line = orjson.loads(raw)
            body = line.get("body") or {}
            cid = line.get("custom_id")
            if b.batch_error_rate and self._rng.random() < b.batch_error_rate:
                errors.append({"id": _id("batch_req"), "custom_id": cid, "error": None,
                               "response": {"status_code": 500, "body": {
                                   "error": {"message": "mock line failure"}}}})
                continue
            answer = completion_body(str(body.get("model", "mock")), _prompt_text(body))
            out.append({"id": _id("batch_req"), "custom_id": cid, "error": None,
                        "response": {"status_code": 200, "request_id": _id("req"),
                                     "body": answer}})
        self.stats["lines_answered"] += len(out)
        self.stats["lines_failed"] += len(errors)
        doc["status"] = "completed"
        doc["request_counts"].update(completed=len(out), failed=len(errors))
        for key, rows in (("output_file_id", out), ("error_file_id", errors)):
            if rows:
                fid = _id("file")
                self.files[fid] = b"".join(orjson.dumps(r) + b"\n" for r in rows)
                doc[key] = fid


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}},
                             status=status)
