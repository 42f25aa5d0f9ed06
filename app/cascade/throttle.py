"""Per-provider-account send guards shared by every worker through Redis.

- A rate limit (GCRA, `app/ratelimit.py`) so several workers respect one provider limit
  between them.
- A circuit breaker that opens when, within `breaker_window_seconds`, at least
  `breaker_threshold` provider-attributed transient errors were counted and they are at
  least `breaker_failure_ratio` of the account's answers; while open the step falls over
  at once instead of waiting out its whole timeout. Recipient errors never count (one dead
  number must not take a provider out), and a busy account's occasional timeout among
  thousands of answers does not either. A batch's outcomes are counted in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis

from app.ratelimit import GCRA_LUA
from providers.accounts import ProviderAccount

# Outcomes counted in a window that starts at the first one: KEYS[1] failures, KEYS[2]
# answers (failures included), KEYS[3] the open flag; ARGV: window ms, threshold, cooldown
# ms, failures, other answers, ratio in percent. At the threshold and ratio the circuit
# opens for the cooldown and the counts start over.
_OUTCOMES = """
local failed, answered = tonumber(ARGV[4]), tonumber(ARGV[4]) + tonumber(ARGV[5])
local failures = redis.call('INCRBY', KEYS[1], failed)
if failures == failed then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local answers = redis.call('INCRBY', KEYS[2], answered)
if answers == answered then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
if failed > 0 and failures >= tonumber(ARGV[2])
    and failures * 100 >= tonumber(ARGV[6]) * answers then
  redis.call('SET', KEYS[3], 1, 'PX', ARGV[3])
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""


# Before a batch's sends to one account, one call: is the circuit open, else take up to
# ARGV[3] rate slots (all of them when the account has no rate), and how many failures are
# counted (a success need reset nothing when none). Returns {open, slots taken, wait ms
# for the next slot, failures}.
_ADMIT = (
    GCRA_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, 0, 0, 0}
end
local failures = tonumber(redis.call('GET', KEYS[2]) or '0')
local wanted = tonumber(ARGV[3])
if ARGV[1] == '' then
  return {0, wanted, 0, failures}
end
local taken, wait = 0, 0
while taken < wanted do
  wait = gcra(KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]))
  if wait > 0 then
    break
  end
  taken = taken + 1
end
return {0, taken, wait, failures}
"""
)


@dataclass(frozen=True, slots=True)
class Admission:
    circuit_open: bool
    # Sends the rate allows now (their slots are taken).
    slots: int
    # Seconds until the rate allows the next send (0 when every wanted slot was taken).
    wait: float
    # Provider failures counted in the breaker's window when admitted.
    failures: int


class SendGuards:
    def __init__(self, redis: ArqRedis) -> None:
        self._redis = redis
        self._outcomes = redis.register_script(_OUTCOMES)
        self._admit = redis.register_script(_ADMIT)

    async def admit(self, account: ProviderAccount, wanted: int = 1) -> Admission:
        """`circuit_open`, then up to `wanted` rate slots, in one round trip."""
        rate = account.rate_per_second
        circuit_open, slots, wait_ms, failures = await self._admit(
            keys=[
                f"cascade:circuit:{account.name}:open",
                f"cascade:circuit:{account.name}:failures",
                f"cascade:rate:{account.name}",
            ],
            args=(
                ["", 0, wanted] if rate is None else [1000.0 / rate, max(1, account.burst), wanted]
            ),
        )
        return Admission(bool(circuit_open), int(slots), float(wait_ms) / 1000.0, int(failures))

    async def circuit_open(self, account: ProviderAccount) -> bool:
        return bool(await self._redis.exists(f"cascade:circuit:{account.name}:open"))

    async def record_outcomes(
        self, account: ProviderAccount, *, failures: int, successes: int
    ) -> bool:
        """Count a batch's answers from this account (`failures`: provider-attributed
        transient errors; `successes`: every other answer); True when this opened the
        circuit."""
        if not failures and not successes:
            return False
        opened = await self._outcomes(
            keys=[
                f"cascade:circuit:{account.name}:failures",
                f"cascade:circuit:{account.name}:answers",
                f"cascade:circuit:{account.name}:open",
            ],
            args=[
                int(account.breaker_window_seconds * 1000),
                account.breaker_threshold,
                int(account.breaker_cooldown_seconds * 1000),
                failures,
                successes,
                round(account.breaker_failure_ratio * 100),
            ],
        )
        return bool(opened)
