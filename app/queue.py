"""Jobs on arq, one queue per traffic category, with deterministic job ids.

A deterministic id (`msg:{id}:step:{k}`) makes a second enqueue of the same job a no-op
while the first is queued or running, so the sweeper can re-enqueue freely.

After a commit, all the jobs it requested go to Redis in one round trip: one Lua script
call carries them all and runs, per job, the same check-and-add arq's `enqueue_job` does
(instead of WATCH/MULTI), so a batch of 1000 messages is one command, not 1000.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field, replace
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
    # Remove this job (queued, not yet run) instead of adding it: see `withdrawn`.
    withdraw: bool = False


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


def withdrawn(job: Job) -> Job:
    """The same job, to be taken off its queue: a step that ended (delivered, failed) has
    no use for its deadline check, which would otherwise run, lock the message and find
    nothing to do, once per message, a step's timeout later. Best effort: one that runs
    anyway changes nothing."""
    return replace(job, withdraw=True, defer=None, defer_until=None, args=(), kwargs={})


# arq's enqueue_job check-and-add, for each job in turn: skip one whose id is queued,
# running or has a result. The jobs come as one argument (see `_JOB_HEADER`), not as
# 7 arguments each: redis-py packs a command's arguments one by one in Python, which
# cost more than everything else the enqueue did.
_ENQUEUE_IF_NEW = """
local jobs, job_prefix, result_prefix = ARGV[1], ARGV[2], ARGV[3]
local pos, added = 1, 0
while pos <= #jobs do
    local id_len, queue_len, payload_len, expires, score
    id_len, queue_len, payload_len, expires, score, pos =
        struct.unpack('>I2I2I4i8i8', jobs, pos)
    local id = string.sub(jobs, pos, pos + id_len - 1)
    local queue = string.sub(jobs, pos + id_len, pos + id_len + queue_len - 1)
    pos = pos + id_len + queue_len
    local payload = string.sub(jobs, pos, pos + payload_len - 1)
    pos = pos + payload_len
    local job_key = job_prefix .. id
    if payload_len == 0 then
        -- a withdrawal (`withdrawn`): off the queue, if it is still waiting there
        if redis.call('zrem', queue, id) == 1 then
            redis.call('del', job_key)
        end
    elseif redis.call('exists', job_key, result_prefix .. id) == 0 then
        redis.call('psetex', job_key, expires, payload)
        redis.call('zadd', queue, score, id)
        added = added + 1
    end
end
return added
"""
# Per job: the lengths of its id, queue and payload, its key's expiry (ms) and its score
# (ms); then the id, the queue and the payload themselves.
_JOB_HEADER = struct.Struct(">HHIqq")
_KEY_PREFIXES: tuple[str, str] = (job_key_prefix, result_key_prefix)
# Jobs per script call: Redis runs a script without serving anyone else meanwhile.
SCRIPT_CHUNK = 1000


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
        # One by one instead: arq's enqueue skips any the pipeline did add. Withdrawals
        # are dropped: the jobs they would remove run and find nothing to do.
        for job in jobs:
            if job.withdraw:
                continue
            try:
                async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                    await self.enqueue(job)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("enqueue_failed", job_id=job.job_id, error=repr(exc))

    async def enqueue_many(self, jobs: list[Job]) -> int:
        """All `jobs` in one round trip (one script call per `SCRIPT_CHUNK` jobs, pipelined
        when there are more); returns how many were new."""
        if not jobs:
            return 0
        now_ms = timestamp_ms()
        calls: list[list[bytes | str]] = [
            [self._packed(jobs[start : start + SCRIPT_CHUNK], now_ms), *_KEY_PREFIXES]
            for start in range(0, len(jobs), SCRIPT_CHUNK)
        ]
        if len(calls) == 1:
            return int(await self._enqueue_if_new(args=calls[0]))
        async with self.redis.pipeline(transaction=False) as pipe:
            for args in calls:
                await self._enqueue_if_new(args=args, client=pipe)
            added = await pipe.execute()
        return sum(int(result) for result in added)

    def _packed(self, jobs: list[Job], now_ms: int) -> bytes:
        parts: list[bytes] = []
        serializer = self.redis.job_serializer
        for job in jobs:
            if job.defer_until is not None:
                score = to_unix_ms(job.defer_until)
            elif job.defer is not None:
                score = now_ms + round(job.defer.total_seconds() * 1000)
            else:
                score = now_ms
            payload = (
                b""
                if job.withdraw
                else serialize_job(
                    job.function, job.args, job.kwargs, None, now_ms, serializer=serializer
                )
            )
            job_id = job.job_id.encode()
            queue = (job.queue or queue_name(job.category)).encode()
            expires = max(score - now_ms, 0) + expires_extra_ms
            header = _JOB_HEADER.pack(len(job_id), len(queue), len(payload), expires, score)
            parts += (header, job_id, queue, payload)
        return b"".join(parts)
