"""Counting grants measured on the client against a limit kept in Redis."""

from __future__ import annotations

import asyncio
import time

from mockllm.server import max_in_window
from streams.config import EndpointConfig
from streams.dispatch.ratelimit import RateLimiter

# A grant's time as the test sees it (reply received + the slot's wait) lags the slot Redis
# reserved by the reply's trip back, which varies by tens of milliseconds on a loaded machine
# (CI saw 11 grants in a 1.0 s window at 10/s from that alone). A correct limiter spaces its
# slots 1/rate apart, so a window this much narrower than the limit's holds no more than the
# limit, while a burst of even two extra grants still shows.
MEASURE_SLACK = 0.1


def max_in_measured_window(times: list[float], width: float = 1.0) -> int:
    """The most of the sorted client-measured ``times`` within any ``width`` window, less the slack."""
    return max_in_window(times, width - MEASURE_SLACK)


async def limit_run(limiters: list[RateLimiter], endpoint: EndpointConfig, seconds: float,
                    grants: list[float] | None = None) -> list[float]:
    """Each limiter asks for ``endpoint`` in a loop for ``seconds`` (waiting as told when
    refused, releasing each permit at once), as a worker saturating the limit would. Each
    grant's reserved slot as the client sees it goes into ``grants`` as it comes (for a
    caller watching a run in progress); returns them sorted."""
    grants = [] if grants is None else grants
    stop = time.monotonic() + seconds

    async def worker(limiter: RateLimiter) -> None:
        while time.monotonic() < stop:
            decision = await limiter.acquire(endpoint, 1)
            if decision.permit is None:
                await asyncio.sleep(decision.wait)
                continue
            grants.append(time.monotonic() + decision.wait)  # its reserved slot
            limiter.release(decision.permit)

    await asyncio.gather(*(worker(lim) for lim in limiters))
    return sorted(grants)
