"""Per-provider-account send guards shared by every worker through Redis.

- A rate limit (GCRA, `app/ratelimit.py`) so several workers respect one provider limit
  between them.
- A circuit breaker that opens after `breaker_threshold` provider-attributed transient
  errors within `breaker_window_seconds`; while open the step falls over at once instead
  of waiting out its whole timeout. Recipient errors never count (one dead number must not
  take a provider out).
"""

from __future__ import annotations

from arq.connections import ArqRedis

from app.ratelimit import Gcra
from providers.accounts import ProviderAccount

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
        self._gcra = Gcra(redis)
        self._trip = redis.register_script(_TRIP)

    async def wait_for_rate(self, account: ProviderAccount) -> float:
        """Seconds until this account may send again (0: send now, the slot is taken)."""
        if account.rate_per_second is None:
            return 0.0
        return await self._gcra.wait(
            f"cascade:rate:{account.name}", account.rate_per_second, account.burst
        )

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
