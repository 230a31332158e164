"""Stopping a worker in bounded time: steps that may wait on Kafka, and the watchdog behind them.

The whole stop takes at most the grace period plus ``STOP_MARGIN_SECONDS``: what faust and
aiokafka still wait for after our drain (a group coordinator that is gone or moving, a
broker that does not answer) is not waited on past it.

Usage::

    _StopWatchdog.arm(grace + STOP_MARGIN_SECONDS, lambda: runtime.drained)
    await _within(consumer.commit(), STOP_STEP_SECONDS, "the final commit")
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("streams.worker")

# The stop gets this long past the grace period: stopping the consumer (STOP_STEP_SECONDS),
# 5 s for cancelled requests to unwind, the final commit (STOP_STEP_SECONDS) and faust's own
# stop (consumer, group leave, services). Past it the worker exits anyway: 0 once our drain
# is done (what is uncommitted is redelivered), else 1 with what is still running logged.
STOP_MARGIN_SECONDS = 12.0
STOP_STEP_SECONDS = 3.0  # stopping the consumer, the final commit: each at most this long


def task_lines(loop: asyncio.AbstractEventLoop) -> list[str]:
    """One line per task of ``loop``: its name and where it waits (for diagnostics)."""
    lines: list[str] = []
    try:
        for task in asyncio.all_tasks(loop):
            frames = task.get_stack(limit=8)
            where = " <- ".join(
                f"{f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"
                for f in reversed(frames)
            )
            lines.append(f"  {task.get_name()}: {where or 'not started'}")
    except Exception as exc:  # diagnostics only
        lines.append(f"  (tasks unavailable: {type(exc).__name__})")
    return sorted(lines)


class _StopWatchdog:
    """A thread that ends a stop that takes too long.

    When ``drained()`` says our own part of the stop is done, what is left waits on Kafka
    (the group coordinator, a flush to a broker that went away): nothing of ours can be lost
    (unacked records are redelivered), so it logs one line and exits 0. Otherwise our own
    stop hangs: it logs every stack and task, then exits 1. A thread, not a loop timer: it
    must fire even if the event loop itself is stuck.
    """

    _armed = False

    @classmethod
    def arm(cls, seconds: float, drained: Callable[[], bool] = lambda: False) -> None:
        if cls._armed:
            return
        cls._armed = True
        loop = asyncio.get_running_loop()
        timer = threading.Timer(seconds, cls._fire, args=(loop, seconds, drained))
        timer.daemon = True
        timer.start()

    @staticmethod
    def _fire(loop: asyncio.AbstractEventLoop, seconds: float, drained: Callable[[], bool]) -> None:
        if drained():
            log.warning("stop: in-flight work drained, but Kafka's side of the stop (group "
                        "leave, coordinator, flush) is still waiting after %.0f s; exiting 0 "
                        "without it (uncommitted records are redelivered)", seconds)
            code = 0
        else:
            log.error("stop did not finish within %.0f s; exiting 1 (unacked records are "
                      "redelivered). Still running:\n%s", seconds, "\n".join(task_lines(loop)))
            faulthandler.dump_traceback(all_threads=True)
            code = 1
        logging.shutdown()
        os._exit(code)


async def _within(step: Awaitable[Any], seconds: float, what: str) -> None:
    """Await ``step`` for at most ``seconds``, then leave it running and go on (logged).

    Not ``wait_for``: it waits for the cancelled step to unwind, and a step stuck in faust's
    consumer thread on a coordinator that is gone does not.
    """
    task = asyncio.ensure_future(step)
    task.add_done_callback(functools.partial(_log_failure, what))
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        log.warning("%s did not finish within %.0f s (group coordinator away?); going on "
                    "without it (uncommitted records are redelivered)", what, seconds)


def _log_failure(what: str, task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %s", what, type(task.exception()).__name__)
