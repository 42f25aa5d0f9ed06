"""Per-API-key request rate limit, shared by every API process through Redis.

GCRA (the token bucket's exact twin, one Redis key per API key): `rate_per_second`
sustained, `burst` requests at once. Redis' own clock, so API hosts with skewed clocks
share one schedule.
"""

from __future__ import annotations

import uuid

import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

log = structlog.get_logger()

# Returns 0 (allowed, the slot is taken) or the milliseconds until the next slot frees.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local new_tat = math.max(tat, now) + interval
local allow_at = new_tat - interval * burst
if now < allow_at then
  return math.ceil(allow_at - now)
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return 0
"""


class RequestRateLimit:
    def __init__(self, redis: ArqRedis, rate_per_second: float, burst: int) -> None:
        self._gcra = redis.register_script(_GCRA)
        self._rate = rate_per_second
        self._burst = max(1, burst)

    async def retry_after(self, key_id: uuid.UUID) -> float:
        """Seconds until this key may send a request; 0 means go ahead (the slot is taken)."""
        if self._rate <= 0:
            return 0.0
        try:
            wait_ms = await self._gcra(
                keys=[f"cascade:api-rate:{key_id}"], args=[1000.0 / self._rate, self._burst]
            )
        except (RedisError, OSError) as exc:
            # Fail open: a Redis outage must not stop sends, which Postgres alone makes durable.
            log.warning("rate_limit_unavailable", error=repr(exc))
            return 0.0
        return float(wait_ms) / 1000.0
