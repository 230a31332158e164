"""Log lines: human-readable text, or one JSON object per line; request ids; no secrets; throttling.

A line about a request carries its id, as the structured field ``request_id`` (JSON) and as
``[id]`` after the logger name (text)::

    log.warning("dead letter %s: %s", kind, error, extra=request_extra(req.id))

Every line, exception text included, passes a ``Redactor`` of the settings' secrets.

Usage::

    setup_logging("INFO", "json", settings.secret_values())
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from streams.redact import Redactor

REQUEST_ID = "request_id"


def request_extra(request_id: str | None) -> dict[str, Any]:
    """``extra=`` for a log call about a request (nothing when the id is unknown)."""
    return {REQUEST_ID: request_id} if request_id is not None else {}


def _request_id(record: logging.LogRecord) -> str | None:
    value = getattr(record, REQUEST_ID, None)
    return value if isinstance(value, str) else None


class TextFormatter(logging.Formatter):
    """``time level logger [request id]: message``; ids that could break a line are quoted."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(request_tag)s: %(message)s")
        self._redact = redact or Redactor(())

    def format(self, record: logging.LogRecord) -> str:
        rid = _request_id(record)
        if rid is None:
            record.request_tag = ""
        else:
            plain = rid.isprintable() and not any(c in rid for c in " []")
            record.request_tag = f" [{rid if plain else orjson.dumps(rid).decode()}]"
        return self._redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, exception."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or Redactor(())

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        rid = _request_id(record)
        if rid is not None:
            doc[REQUEST_ID] = rid
        if record.exc_info:
            doc["exception"] = self._redact(self.formatException(record.exc_info))
        return orjson.dumps(doc).decode()


def setup_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    """Route every logger to stderr in ``fmt`` ("text" or "json"), masking ``secrets``."""
    redact = Redactor(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class LogThrottle:
    """Counts events and says when to log them: at most once per ``interval``, with the count.

    Usage::

        throttle = LogThrottle(10.0, time.monotonic)
        if n := throttle.due():
            log.warning("... (%d since last report)", n)
    """

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._unreported = 0

    def due(self) -> int:
        """Count one event; the number to report now, or 0 within the interval of the last."""
        self._unreported += 1
        now = self._clock()
        if now - self._last < self._interval:
            return 0
        count, self._unreported, self._last = self._unreported, 0, now
        return count
