"""Counting grants measured on the client against a limit kept in Redis."""

from __future__ import annotations

from mockllm.server import max_in_window

# A grant's time as the test sees it (reply received + the slot's wait) lags the slot Redis
# reserved by the reply's trip back, which varies by tens of milliseconds on a loaded machine
# (CI saw 11 grants in a 1.0 s window at 10/s from that alone). A correct limiter spaces its
# slots 1/rate apart, so a window this much narrower than the limit's holds no more than the
# limit, while a burst of even two extra grants still shows.
MEASURE_SLACK = 0.1


def max_in_measured_window(times: list[float], width: float = 1.0) -> int:
    """The most of the sorted client-measured ``times`` within any ``width`` window, less the slack."""
    return max_in_window(times, width - MEASURE_SLACK)
