"""The last look before an upstream call: is the caller's claim on the request still its own?

A request is called upstream only by the holder of its coalescing lock (``cache/coalesce.py``).
The lock is taken before the dispatch, but the call may come seconds later (a request waits
for an in-flight slot, a rate limit, its fair share); on a machine whose event loop lags, the
lock may have expired meanwhile and another worker taken it, called and published. So the
coalescer sets a check for its dispatch (a context variable: it follows the dispatch into
the dispatcher without a parameter on every layer between), and the dispatcher runs it once
it holds a grant for an attempt, before it waits for the grant's rate slot (at most
``RESERVE_AHEAD_SECONDS`` or four slots ahead). The check renews the lock; a lock that is no
longer ours raises ``ClaimLost`` and the call is not made (the grant is given back). Made
after the wait, a slow check (Redis failing over) would hold back sends whose slots passed
meanwhile, and they would go at once, above the limit; made before it, a check that takes the
request past its slot makes it ask for a new one (``calls.py``).

Usage::

    token = CLAIM.set(lambda: locks.extend(key, token, ttl_ms))   # the coalescer
    ...
    await check_claim()   # the dispatcher, for each grant; raises ClaimLost
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from streams.errors import ClaimLost

Claim = Callable[[], Awaitable[bool]]  # True: still ours (renewed), or Redis did not say

CLAIM: ContextVar[Claim | None] = ContextVar("llm_streams_claim", default=None)


async def check_claim() -> None:
    """Raise ``ClaimLost`` if the current dispatch's claim (if any) is no longer its own."""
    claim = CLAIM.get()
    if claim is not None and not await claim():
        raise ClaimLost("the coalescing lock was taken by another worker before the call")
