"""The shared limiter's Redis scripts: GCRA with reservations, and the tpm correction.

Each script runs atomically on Redis' own clock, so workers never disagree about time
(``ratelimit.RateLimiter`` calls them by SHA, loading them on ``NOSCRIPT``).

Usage::

    await redis.evalsha(sha(ACQUIRE_LUA), len(keys), *keys, *args)
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

# GCRA with reservations. Each key holds a "theoretical arrival time" (tat); a request's slot is
# the latest of (tat - tolerance) over its keys, or now. A slot within ARGV[6] us is granted
# (reserved: tat moves past the slot, never back to "now" because we are late); a later one is
# refused. KEYS: n GCRA keys, then the concurrency lease set when ARGV[2] > 0.
# ARGV: n, concurrency max, lease id, lease us, poll us, ahead us, then per key:
#       interval us, tolerance us, cost.
# Returns {allowed, us until the slot (refused: until the earliest slot, or the poll), index of
# the refusing key (1-based; n+1 = concurrency)}.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local cmax = tonumber(ARGV[2])
local slot, idx = now, 0
local tats = {}
for i = 1, n do
  local b = 6 + (i - 1) * 3
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  tats[i] = tat
  if tat - tonumber(ARGV[b + 2]) > slot then slot, idx = tat - tonumber(ARGV[b + 2]), i end
end
if slot - now > tonumber(ARGV[6]) then return {0, string.format('%.0f', slot - now), idx} end
if cmax > 0 then
  local ck = KEYS[n + 1]
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  if redis.call('ZCARD', ck) >= cmax then return {0, ARGV[5], n + 1} end
  redis.call('ZADD', ck, now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', ck, math.ceil(tonumber(ARGV[4]) / 1000) + 1000)
end
for i = 1, n do
  local b = 6 + (i - 1) * 3
  local tat = math.max(tats[i], slot) + tonumber(ARGV[b + 1]) * tonumber(ARGV[b + 3])
  redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return {1, string.format('%.0f', slot - now), 0}
"""

# KEYS[1] a GCRA key; ARGV[1] microseconds to add (negative: give back).
ADJUST_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1])
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
return 1
"""


def sha(src: str) -> str:
    return hashlib.sha1(src.encode()).hexdigest()


async def run_script(redis: Any, src: str, keys: Sequence[str], args: Sequence[Any],
                     timeout: float) -> Any:
    """Run a script by its SHA (loading it on ``NOSCRIPT``) within ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        try:
            return await redis.evalsha(sha(src), len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(src, len(keys), *keys, *args)
