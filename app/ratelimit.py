"""GCRA rate limiting in Redis (the token bucket's exact twin, one key per limited thing).

Redis' own clock, so processes on hosts with skewed clocks share one schedule. Used for
per-API-key request limits and per-provider-account send limits.
"""

from __future__ import annotations

from arq.connections import ArqRedis

# `gcra(key, interval_ms, burst)`: 0 (allowed, the slot is taken) or the milliseconds until
# the next slot frees. A function, so scripts that check more in the same call reuse it.
GCRA_LUA = """
local function gcra(key, interval, burst)
  local now_parts = redis.call('TIME')
  local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
  local tat = tonumber(redis.call('GET', key) or now)
  local new_tat = math.max(tat, now) + interval
  local allow_at = new_tat - interval * burst
  if now < allow_at then
    return math.ceil(allow_at - now)
  end
  redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now) + 1000)
  return 0
end
"""
_GCRA = GCRA_LUA + "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"

# `take(key, interval_ms, burst, n)`: up to `n` slots at once, as many as are free now;
# returns {slots taken, milliseconds until the next slot frees after them}.
_TAKE = """
local key, interval, burst, n = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local base = math.max(tonumber(redis.call('GET', key) or now), now)
local free = math.floor((now - base + interval * burst) / interval + 1e-9)
local taken = math.max(0, math.min(n, free))
if taken > 0 then
  base = base + interval * taken
  redis.call('SET', key, base, 'PX', math.ceil(base - now) + 1000)
end
return {taken, math.max(0, math.ceil(base + interval - interval * burst - now))}
"""


class Gcra:
    def __init__(self, redis: ArqRedis) -> None:
        self._script = redis.register_script(_GCRA)
        self._take = redis.register_script(_TAKE)

    async def wait(self, key: str, rate_per_second: float, burst: int) -> float:
        """Seconds until `key` may go again; 0 means go ahead (the slot is taken)."""
        wait_ms = await self._script(keys=[key], args=[1000.0 / rate_per_second, max(1, burst)])
        return float(wait_ms) / 1000.0

    async def take(self, key: str, rate_per_second: float, burst: int, n: int) -> tuple[int, float]:
        """Up to `n` slots of `key` at once: how many were taken, and the seconds until the
        next one frees after them."""
        taken, wait_ms = await self._take(
            keys=[key], args=[1000.0 / rate_per_second, max(1, burst), max(1, n)]
        )
        return int(taken), float(wait_ms) / 1000.0
