"""Jobs on arq, one queue per traffic category, with deterministic job ids.

A deterministic id (`msg:{id}:step:{k}`) makes a second enqueue of the same job a no-op
while the first is queued or running, so the sweeper can re-enqueue freely.

After a commit, all the jobs it requested go to Redis in one pipelined round trip, each
through the same check-and-add arq's `enqueue_job` does (a Lua script instead of
WATCH/MULTI), so a batch of 1000 messages is one round trip, not 1000.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.exceptions import RedisError

from providers.base import Category

log = structlog.get_logger()


def queue_name(category: Category | str) -> str:
    return f"cascade:{Category(category).value}"


@dataclass(frozen=True, slots=True)
class Job:
    function: str
    category: Category
    job_id: str
    args: tuple[Any, ...] = ()
    defer: timedelta | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # A queue of its own instead of the category's (webhooks: slow receivers never delay sends).
    queue: str | None = None
    defer_until: datetime | None = None


def send_step_job(
    message_id: str,
    category: Category,
    step: int,
    try_number: int = 0,
    defer: timedelta | None = None,
    not_before: datetime | None = None,
    deferred_again: bool = False,
) -> Job:
    """`not_before` defers the send to a moment; `deferred_again` marks a re-deferral from
    inside a running send job, whose own id is still taken until it finishes."""
    suffix = f":try:{try_number}" if try_number else ""
    if not_before is not None and deferred_again:
        suffix += f":at:{to_unix_ms(not_before)}"
    return Job(
        "send_step",
        category,
        f"msg:{message_id}:step:{step}{suffix}",
        (message_id, step),
        defer,
        defer_until=not_before,
    )


def expire_message_job(message_id: str, category: Category, at: datetime) -> Job:
    return Job(
        "expire_message", category, f"msg:{message_id}:expire", (message_id,), defer_until=at
    )


def cancel_provider_send_job(category: Category, provider: str, provider_message_id: str) -> Job:
    """Withdraw a send the cascade gave up on, where the provider can (see `Cancellable`)."""
    return Job(
        "cancel_provider_send",
        category,
        f"cancel:{provider}:{provider_message_id}",
        (provider, provider_message_id),
    )


def step_deadline_job(message_id: str, category: Category, step: int, defer: timedelta) -> Job:
    return Job(
        "step_deadline", category, f"msg:{message_id}:deadline:{step}", (message_id, step), defer
    )


# arq's enqueue_job check-and-add: skip a job whose id is queued, running or has a result.
_ENQUEUE_IF_NEW = """
if redis.call('exists', KEYS[1], KEYS[2]) == 0 then
    redis.call('psetex', KEYS[1], ARGV[1], ARGV[2])
    redis.call('zadd', KEYS[3], ARGV[3], ARGV[4])
    return 1
end
return 0
"""


ENQUEUE_TIMEOUT_SECONDS = 2.0


class JobQueue:
    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self._enqueue_if_new = redis.register_script(_ENQUEUE_IF_NEW)

    async def enqueue(self, job: Job) -> None:
        await self.redis.enqueue_job(
            job.function,
            *job.args,
            _job_id=job.job_id,
            _queue_name=job.queue or queue_name(job.category),
            _defer_by=job.defer,
            _defer_until=job.defer_until,
            **job.kwargs,
        )

    async def enqueue_all(self, jobs: list[Job]) -> None:
        """Enqueue after commit; a Redis failure here loses nothing (the sweeper re-enqueues)."""
        if not jobs:
            return
        try:
            # Bounded: a hanging Redis must not hold the caller (a claimed send) until
            # arq's job timeout cancels it.
            async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                await self.enqueue_many(jobs)
            return
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("enqueue_script_failed", jobs=len(jobs), error=repr(exc))
            if len(jobs) == 1:
                return
        # One by one instead: arq's enqueue skips any the pipeline did add.
        for job in jobs:
            try:
                async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                    await self.enqueue(job)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("enqueue_failed", job_id=job.job_id, error=repr(exc))

    async def enqueue_many(self, jobs: list[Job]) -> int:
        """All `jobs` in one round trip (a lone job skips the pipeline's script check);
        returns how many were new."""
        if not jobs:
            return 0
        now_ms = timestamp_ms()
        if len(jobs) == 1:
            keys, args = self._script_call(jobs[0], now_ms)
            return int(await self._enqueue_if_new(keys=keys, args=args))
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                keys, args = self._script_call(job, now_ms)
                await self._enqueue_if_new(keys=keys, args=args, client=pipe)
            added = await pipe.execute()
        return sum(int(result) for result in added)

    def _script_call(self, job: Job, now_ms: int) -> tuple[list[str], list[Any]]:
        if job.defer_until is not None:
            score = to_unix_ms(job.defer_until)
        elif job.defer is not None:
            score = now_ms + round(job.defer.total_seconds() * 1000)
        else:
            score = now_ms
        payload = serialize_job(
            job.function, job.args, job.kwargs, None, now_ms, serializer=self.redis.job_serializer
        )
        keys = [
            job_key_prefix + job.job_id,
            result_key_prefix + job.job_id,
            job.queue or queue_name(job.category),
        ]
        return keys, [max(score - now_ms, 0) + expires_extra_ms, payload, score, job.job_id]
