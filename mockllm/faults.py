"""The mock's behaviour (``MockBehaviour``, changed at run time by POST /config) and its fault kinds.

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

The checks here validate a chaos mix, ``error_headers`` and ``refuse_inputs`` before they are
applied (POST /config, the CLI's ``--faults``); ``reset_connection`` is the ``reset`` fault.

Usage::

    behaviour = MockBehaviour(latency_ms=50, faults=parse_faults("500=0.2,hang=0.05"))
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field

from aiohttp import web


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


def parse_faults(text: str) -> dict[str, float]:
    """``500=0.2,429=0.1,hang=0.05`` -> a checked chaos mix (the CLI's ``--faults``)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, share = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: expected KIND=SHARE")
        mix[kind.strip()] = float(share)
    return check_faults(mix)


def reset_connection(request: web.Request) -> web.StreamResponse:
    """Abort the connection with a TCP reset (SO_LINGER 0); nothing is sent back."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)  # never written: the connection is gone
