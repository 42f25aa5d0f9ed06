"""Jobs on arq, one queue per traffic category, with deterministic job ids.

A deterministic id (`msg:{id}:step:{k}`) makes a second enqueue of the same job a no-op
while the first is queued or running, so the sweeper can re-enqueue freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis
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


def send_step_job(
    message_id: str,
    category: Category,
    step: int,
    try_number: int = 0,
    defer: timedelta | None = None,
) -> Job:
    suffix = f":try:{try_number}" if try_number else ""
    return Job(
        "send_step",
        category,
        f"msg:{message_id}:step:{step}{suffix}",
        (message_id, step),
        defer,
    )


def step_deadline_job(message_id: str, category: Category, step: int, defer: timedelta) -> Job:
    return Job(
        "step_deadline", category, f"msg:{message_id}:deadline:{step}", (message_id, step), defer
    )


class JobQueue:
    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis

    async def enqueue(self, job: Job) -> None:
        await self.redis.enqueue_job(
            job.function,
            *job.args,
            _job_id=job.job_id,
            _queue_name=queue_name(job.category),
            _defer_by=job.defer,
            **job.kwargs,
        )

    async def enqueue_all(self, jobs: list[Job]) -> None:
        """Enqueue after commit; a Redis failure here loses nothing (the sweeper re-enqueues)."""
        for job in jobs:
            try:
                await self.enqueue(job)
            except (RedisError, OSError) as exc:
                log.warning("enqueue_failed", job_id=job.job_id, error=repr(exc))
