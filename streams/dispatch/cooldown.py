"""Endpoint cooldowns, shared across workers through Redis (local state if Redis is down).

An endpoint that answers 429, or fails ``retry.cooldown_after_failures`` times in a row (as
seen by one worker), is cooled down until ``now + period``: the Retry-After it sent (capped
by ``retry.max_retry_after_ms``) or else ``retry.cooldown_seconds``. Failing again while
cooling extends the deadline: the stored deadline is always the max of the old and the new
one, never shortened. Once the deadline passes, exactly one probe request is let through
(one worker wins ``SET NX`` on the probe key; it expires by itself if that worker dies):
success makes the endpoint healthy, failure cools it down again. A cooled-down endpoint
gets no traffic, so its share flows to the others (see ``balancer.py``).

Every value from outside is bounded: a Retry-After that is not a number is ignored, any
other is clamped to ``[0, retry.max_retry_after_ms]``; a deadline read back from Redis that
is not a finite epoch within the longest possible cooldown is ignored and overwritten.

Reads are local and synchronous (the dispatcher checks every pick); ``sync()`` pushes this
worker's changes and pulls the group's state, and runs in the dispatcher's background loop.
Deadlines are epoch seconds from the injected clock (wall time, common to all hosts).

Usage::

    cooldowns = Cooldowns(settings.endpoints, settings.retry, redis, key_prefix="llmstreams")
    if cooldowns.usable("a"):
        probe = cooldowns.needs_probe("a") and await cooldowns.try_probe("a")
        ...
        cooldowns.record_failure("a", probe=probe, rate_limited=True, retry_after=2.0)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from streams.config import EndpointConfig, RetryConfig
from streams.dispatch.retry import bounded_wait
from streams.redis_cluster import shared_tag
from streams.redis_guard import REDIS_ERRORS, CommandErrorLog, RedisGuard, is_outage

log = logging.getLogger("streams.cooldown")

_REDIS_ERRORS = REDIS_ERRORS
# A deadline key outlives its deadline so "needs a probe" survives until a probe decides.
_STATE_TTL_MS = 24 * 3600 * 1000
# The probe lock outlives the probe's own hard timeout by this much.
_PROBE_MARGIN_SECONDS = 5.0
_REDIS_RETRY_SECONDS = 1.0

# A deadline read back from Redis further ahead than the longest cooldown by more than this
# (clock skew between hosts) was not written by a sane worker: it is ignored and overwritten.
_SKEW_SECONDS = 60.0

# KEYS[1] deadline key, KEYS[2] probe key; ARGV[1] deadline ms, ARGV[2] ttl ms,
# ARGV[3] '1' to drop the probe lock, ARGV[4] the latest plausible deadline ms.
# Keeps the later deadline; returns the stored one. A stored value that is not a plausible
# deadline (garbage, NaN, inf, too far ahead: another version's or a stranger's) counts as 0.
_EXTEND_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur == nil or cur ~= cur or cur > tonumber(ARGV[4]) then cur = 0 end
local new = tonumber(ARGV[1])
if new > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  cur = new
end
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
return tostring(cur)
"""


class EndpointState(StrEnum):
    HEALTHY = "healthy"
    COOLING = "cooling"
    PROBING = "probing"  # cooldown over; waiting for (or running) the single probe


@dataclass(slots=True)
class _State:
    until: float | None = None  # cooldown deadline (epoch s); None = healthy
    fails: int = 0  # consecutive failures seen by this worker
    probing_local: bool = False  # this worker holds the probe
    probing_remote: bool = False  # another worker holds it (as of the last sync)
    version: int = 0  # bumped on local changes ...
    synced: int = 0  # ... and the version Redis has seen
    drop_probe: bool = False  # the next push also deletes the probe lock


class Cooldowns:
    """Cooldown state of every endpoint; one instance per worker."""

    def __init__(
        self,
        endpoints: Sequence[EndpointConfig],
        config: RetryConfig,
        redis: Any | None,
        *,
        key_prefix: str = "llmstreams",
        clock: Callable[[], float] = time.time,
        op_timeout: float = 1.0,
    ) -> None:
        self._endpoints = {e.name: e for e in endpoints}
        self._states = {e.name: _State() for e in endpoints}
        self._redis = redis
        self._clock = clock
        self._timeout = op_timeout
        self._threshold = config.cooldown_after_failures
        self._period = config.cooldown_seconds
        self._max_retry_after = config.max_retry_after_ms / 1000.0
        # The furthest ahead a deadline read from Redis may lie (see _SKEW_SECONDS).
        self._horizon = max(self._period, self._max_retry_after) + _SKEW_SECONDS
        self._unreadable: set[str] = set()  # endpoints whose bad stored deadline was logged
        self._base = f"{shared_tag(key_prefix)}:cd"  # one slot: scripts and MGET span keys
        self._owner = uuid.uuid4().hex
        self._command_errors = CommandErrorLog(log, "cooldowns", clock=clock)
        self._guard = RedisGuard(
            clock=clock, retry_seconds=_REDIS_RETRY_SECONDS,
            on_down=lambda exc: log.warning(
                "redis unreachable for cooldowns (%s); each worker keeps its own until it returns",
                type(exc).__name__,
            ),
            on_up=lambda: log.warning("redis reachable again; endpoint cooldowns are shared again"),
            commands=self._command_errors,
        )

    # ---- reads (local, synchronous) ----------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Shared with the other workers through Redis (a client was given)."""
        return self._redis is not None

    def state(self, name: str, now: float | None = None) -> EndpointState:
        st = self._states[name]
        if st.until is None:
            return EndpointState.HEALTHY
        now = self._clock() if now is None else now
        return EndpointState.COOLING if now < st.until else EndpointState.PROBING

    def usable(self, name: str, now: float | None = None) -> bool:
        """Healthy, or due for a probe that nobody is running yet."""
        st = self._states[name]
        if st.until is None:
            return True
        now = self._clock() if now is None else now
        return now >= st.until and not st.probing_local and not st.probing_remote

    def needs_probe(self, name: str, now: float | None = None) -> bool:
        return self._states[name].until is not None and self.usable(name, now)

    def next_change(self, now: float) -> float | None:
        """The earliest cooldown deadline still ahead of ``now`` (when to look again)."""
        ahead = [s.until for s in self._states.values() if s.until is not None and s.until > now]
        return min(ahead) if ahead else None

    @property
    def degraded(self) -> bool:
        return self._guard.degraded

    # ---- probe ---------------------------------------------------------------------------------

    async def try_probe(self, name: str) -> bool:
        """Claim the single probe of ``name`` for this request (across workers if shared)."""
        st = self._states[name]
        if not self.needs_probe(name):
            return False
        st.probing_local = True  # claim locally first: concurrent callers see it at once
        if not self._use_redis():
            return True
        ttl = self._endpoints[name].timeout_seconds + _PROBE_MARGIN_SECONDS
        try:
            async with asyncio.timeout(self._timeout):
                won = await self._redis.set(  # type: ignore[union-attr]
                    self._key(name, "probe"), self._owner, nx=True, px=round(ttl * 1000)
                )
        except _REDIS_ERRORS as exc:
            self._guard.failed("probe", exc)
            return True  # nobody else can be told; this worker probes on its own
        if not won:
            st.probing_local = False
            st.probing_remote = True
        return bool(won)

    def abandon_probe(self, name: str) -> None:
        """The probe request ended without a verdict (cancelled, or no permit)."""
        st = self._states[name]
        if st.probing_local:
            st.probing_local = False
            self._touch(st, drop_probe=True)

    # ---- outcomes ------------------------------------------------------------------------------

    def record_success(self, name: str, *, probe: bool = False) -> None:
        st = self._states[name]
        st.fails = 0
        if probe:
            # Only the probe heals: a straggler's success does not cut a 429's Retry-After.
            st.probing_local = False
            st.until = None
            self._touch(st, drop_probe=True)

    def record_failure(
        self,
        name: str,
        *,
        probe: bool = False,
        rate_limited: bool = False,
        retry_after: float | None = None,
    ) -> bool:
        """Count a failure; return True if the endpoint is (now, or still) cooling down."""
        st = self._states[name]
        st.fails += 1
        if not (probe or rate_limited or st.fails >= self._threshold or st.until is not None):
            return False
        asked = bounded_wait(retry_after, self._max_retry_after)
        period = self._period if asked is None else asked
        until = self._clock() + period
        if st.until is None or until > st.until:  # extend, never shorten
            st.until = until
            log.info("endpoint %s cooling down for %.1f s", name, period)
        if probe:
            st.probing_local = False
        self._touch(st, drop_probe=probe)
        return True

    # ---- sharing -------------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Push local changes, pull the group's state. True if anything visible changed."""
        if self._redis is None or not self._use_redis():
            return False
        try:
            async with asyncio.timeout(self._timeout * 2):
                await self._push()
                changed = await self._pull()
        except _REDIS_ERRORS as exc:
            self._guard.failed("sync", exc)
            return False
        self._guard.succeeded()
        return changed

    def _key(self, name: str, what: str) -> str:
        return f"{self._base}:{name}:{what}"

    def _touch(self, st: _State, *, drop_probe: bool) -> None:
        st.version += 1
        st.drop_probe = st.drop_probe or drop_probe

    async def _push(self) -> None:
        assert self._redis is not None
        for name, st in self._states.items():
            if st.version == st.synced:
                continue
            try:
                await self._push_one(name, st)
            except _REDIS_ERRORS as exc:
                if is_outage(exc):
                    raise
                self._command_errors.note(exc)  # this endpoint's state only; push the others

    async def _push_one(self, name: str, st: _State) -> None:
        assert self._redis is not None
        version, drop = st.version, st.drop_probe
        until_key, probe_key = self._key(name, "until"), self._key(name, "probe")
        if st.until is None:
            keys = [until_key, probe_key] if drop else [until_key]
            await self._redis.delete(*keys)
        else:
            now_ms = round(self._clock() * 1000)
            ms = round(st.until * 1000)
            ttl = max(ms - now_ms, 0) + _STATE_TTL_MS
            latest = now_ms + round(self._horizon * 1000)
            stored = await self._redis.eval(
                _EXTEND_LUA, 2, until_key, probe_key, ms, ttl, "1" if drop else "0", latest
            )
            theirs = self._deadline(name, stored)
            if st.until is not None and theirs is not None:  # a later deadline wins
                st.until = max(st.until, theirs)
        if st.version == version:
            st.synced = version
            st.drop_probe = False

    async def _pull(self) -> bool:
        assert self._redis is not None
        names = list(self._states)
        keys = [self._key(n, "until") for n in names] + [self._key(n, "probe") for n in names]
        values = await self._redis.mget(keys)
        changed = False
        for i, name in enumerate(names):
            st = self._states[name]
            if st.version != st.synced:
                continue  # a local change is newer than what we read
            raw_until, raw_probe = values[i], values[len(names) + i]
            until = self._deadline(name, raw_until)
            owner = raw_probe.decode(errors="replace") if isinstance(raw_probe, bytes) else raw_probe
            remote = owner is not None and owner != self._owner
            if until != st.until or remote != st.probing_remote:
                changed = True
            st.until, st.probing_remote = until, remote
            if until is None:
                st.probing_local = False
        return changed

    def _deadline(self, name: str, raw: Any) -> float | None:
        """A deadline (epoch s) read from Redis, or None when absent or not plausible.

        Anything may sit in Redis (an older version's value, a stranger's write): a value
        that is not a number, not finite, or further ahead than any cooldown can last is
        ignored (logged once per endpoint), never trusted.
        """
        if raw is None:
            return None
        try:
            until = float(raw) / 1000.0
        except (TypeError, ValueError):
            until = math.nan
        if math.isfinite(until) and until <= self._clock() + self._horizon:
            return until
        if name not in self._unreadable:
            self._unreadable.add(name)
            log.warning("ignoring an implausible cooldown deadline stored in redis for "
                        "endpoint %s; the next cooldown overwrites it", name)
        return None

    def _use_redis(self) -> bool:
        return self._redis is not None and self._guard.available()
