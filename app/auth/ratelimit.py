"""Per-API-key request rate limit, shared by every API process through Redis.

`rate_per_second` sustained, `burst` requests at once (GCRA, see `app/ratelimit.py`).
"""

from __future__ import annotations

import uuid

import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from app.ratelimit import Gcra

log = structlog.get_logger()


class RequestRateLimit:
    def __init__(self, redis: ArqRedis, rate_per_second: float, burst: int) -> None:
        self._gcra = Gcra(redis)
        self._rate = rate_per_second
        self._burst = max(1, burst)

    async def retry_after(self, key_id: uuid.UUID) -> float:
        """Seconds until this key may send a request; 0 means go ahead (the slot is taken)."""
        if self._rate <= 0:
            return 0.0
        try:
            return await self._gcra.wait(f"cascade:api-rate:{key_id}", self._rate, self._burst)
        except (RedisError, OSError) as exc:
            # Fail open: a Redis outage must not stop sends, which Postgres alone makes durable.
            log.warning("rate_limit_unavailable", error=repr(exc))
            return 0.0
