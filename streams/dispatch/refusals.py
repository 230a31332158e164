"""The limiter's refusals as this worker remembers them: until when each endpoint (or, for the
global ``rps`` limit, every endpoint) was refused, and by which limit.

Admission asks Redis again only once a cached refusal has ended, or earlier when an event may
have ended it (a permit of ours given back). A refusal is cached for at most
``MAX_CACHED_WAIT_SECONDS``: another worker's refund or released lease may end it sooner, and
we hear no event of those.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_CACHED_WAIT_SECONDS = 1.0


class Refusals:
    """Cached refusals per endpoint and for all endpoints (see the module docstring)."""

    def __init__(self, endpoints: Iterable[str]) -> None:
        names = list(endpoints)
        self._until = dict.fromkeys(names, 0.0)
        self._by = dict.fromkeys(names, "")
        self.everywhere_until = 0.0  # the global rps limit binds every endpoint

    def refused(self, name: str, now: float) -> bool:
        return self._until[name] > now

    def everywhere(self, now: float) -> bool:
        return self.everywhere_until > now

    def note(self, name: str, limit: str, wait: float, now: float) -> None:
        """``name``'s ``limit`` refused a request for ``wait`` seconds."""
        wait = min(wait, MAX_CACHED_WAIT_SECONDS)
        if wait <= 0:
            return
        if limit == "rps":
            self.everywhere_until = now + wait
        else:
            self._until[name] = now + wait
            self._by[name] = limit

    def released(self, name: str, refund: bool) -> bool:
        """A permit of ``name`` came back (``refund``: with tokens): True if that may have ended
        its refusal (a concurrency slot freed, tokens given back), which is then forgotten."""
        by = self._by[name]
        if by == "concurrency" or (refund and by == "tpm"):
            self._until[name] = 0.0
            self._by[name] = ""
            return True
        return False

    def ends(self, now: float) -> list[float]:
        """When the refusals still in force end."""
        times = [t for t in self._until.values() if t > now]
        if self.everywhere_until > now:
            times.append(self.everywhere_until)
        return times
