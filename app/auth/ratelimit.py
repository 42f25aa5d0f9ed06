"""Per-API-key request rate limit, shared by every API process through Redis.

`rate_per_second` sustained, `burst` requests at once (GCRA, see `app/ratelimit.py`).

Local first: a process takes slots from Redis for all the requests of a key waiting at
that moment in one call (concurrent requests never each make their own round trip), plus,
for a key allowed many requests per second, as many more as it used from its last lease,
kept for up to `LEASE_SECONDS` (at most a tenth of a second's worth of the rate, at most
half the burst). Slots kept but not used by then are dropped, so the limit can only come
out a little stricter than configured, never looser; a lease follows what the process
actually sends, so idle processes hold nothing. A tight limit (under 10/s) leases nothing
ahead: exact.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from app.ratelimit import Gcra

log = structlog.get_logger()

LEASE_SECONDS = 0.1
_MAX_KEYS = 10_000


@dataclass
class _Lease:
    slots: int = 0
    until: float = 0.0
    used: int = 0


@dataclass
class _Ask:
    """One Redis call for a key, shared by the requests waiting when it is sent."""

    waiters: int = 0
    sent: bool = False
    # (seconds until the next slot, fail open): set when the call returns.
    answer: asyncio.Future[tuple[float, bool]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RequestRateLimit:
    def __init__(self, redis: ArqRedis, rate_per_second: float, burst: int) -> None:
        self._gcra = Gcra(redis)
        self._rate = rate_per_second
        self._burst = max(1, burst)
        self._ahead = min(int(rate_per_second * LEASE_SECONDS), self._burst // 2)
        self._leases: dict[uuid.UUID, _Lease] = {}
        self._asks: dict[uuid.UUID, _Ask] = {}

    async def retry_after(self, key_id: uuid.UUID) -> float:
        """Seconds until this key may send a request; 0 means go ahead (the slot is taken)."""
        if self._rate <= 0:
            return 0.0
        while True:
            if self._take_leased(key_id):
                return 0.0
            ask = self._asks.get(key_id)
            if ask is not None and ask.sent:
                # Sent before this request came: its slots were counted for others.
                await asyncio.shield(ask.answer)
                continue
            if ask is None:
                ask = self._asks[key_id] = _Ask()
                asyncio.get_running_loop().create_task(self._ask(key_id, ask))
            ask.waiters += 1
            wait, fail_open = await asyncio.shield(ask.answer)
            if fail_open or self._take_leased(key_id):
                return 0.0
            if wait > 0:
                return wait

    def _take_leased(self, key_id: uuid.UUID) -> bool:
        lease = self._leases.get(key_id)
        if lease is None or lease.slots <= 0 or lease.until < time.monotonic():
            return False
        lease.slots -= 1
        lease.used += 1
        return True

    async def _ask(self, key_id: uuid.UUID, ask: _Ask) -> None:
        await asyncio.sleep(0)  # the requests of this turn of the loop join the call
        ask.sent = True
        last = self._leases.get(key_id)
        ahead = min(self._ahead, last.used) if last is not None else 0
        try:
            taken, wait = await self._gcra.take(
                f"cascade:api-rate:{key_id}", self._rate, self._burst, ask.waiters + ahead
            )
        except (RedisError, OSError) as exc:
            # Fail open: a Redis outage must not stop sends, which Postgres alone makes durable.
            log.warning("rate_limit_unavailable", error=repr(exc))
            self._asks.pop(key_id, None)
            ask.answer.set_result((0.0, True))
            return
        except BaseException as exc:
            self._asks.pop(key_id, None)
            ask.answer.set_exception(exc)
            raise
        if len(self._leases) >= _MAX_KEYS:
            self._leases.clear()
        self._leases[key_id] = _Lease(taken, time.monotonic() + LEASE_SECONDS)
        self._asks.pop(key_id, None)
        ask.answer.set_result((wait, False))
