"""Per-provider-account send guards shared by every worker through Redis.

- A rate limit (GCRA, the token bucket's exact twin) so several workers respect one
  provider limit between them.
- A circuit breaker that opens after `breaker_threshold` provider-attributed transient
  errors within `breaker_window_seconds`; while open the step falls over at once instead
  of waiting out its whole timeout. Recipient errors never count (one dead number must not
  take a provider out).
"""

from __future__ import annotations

from arq.connections import ArqRedis

from providers.accounts import ProviderAccount

# Redis' own clock, so workers on hosts with skewed clocks share one schedule.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local new_tat = math.max(tat, now) + interval
local allow_at = new_tat - interval * burst
if now < allow_at then
  return allow_at - now
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return 0
"""


# Failures counted in a window that starts at the first one; at the threshold the circuit
# opens for the cooldown and the count starts over.
_TRIP = """
local failures = redis.call('INCR', KEYS[1])
if failures == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if failures >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class SendGuards:
    def __init__(self, redis: ArqRedis) -> None:
        self._redis = redis
        self._gcra = redis.register_script(_GCRA)
        self._trip = redis.register_script(_TRIP)

    async def wait_for_rate(self, account: ProviderAccount) -> float:
        """Seconds until this account may send again (0: send now, the slot is taken)."""
        if account.rate_per_second is None:
            return 0.0
        interval_ms = 1000.0 / account.rate_per_second
        wait_ms = await self._gcra(
            keys=[f"cascade:rate:{account.name}"], args=[interval_ms, account.burst]
        )
        return float(wait_ms) / 1000.0

    async def circuit_open(self, account: ProviderAccount) -> bool:
        return bool(await self._redis.exists(f"cascade:circuit:{account.name}:open"))

    async def record_provider_failure(self, account: ProviderAccount) -> bool:
        """Count one provider-attributed failure; returns True when this opened the circuit."""
        opened = await self._trip(
            keys=[
                f"cascade:circuit:{account.name}:failures",
                f"cascade:circuit:{account.name}:open",
            ],
            args=[
                int(account.breaker_window_seconds * 1000),
                account.breaker_threshold,
                int(account.breaker_cooldown_seconds * 1000),
            ],
        )
        return bool(opened)

    async def record_success(self, account: ProviderAccount) -> None:
        await self._redis.delete(f"cascade:circuit:{account.name}:failures")
