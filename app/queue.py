"""Jobs on arq, one queue per traffic category, with deterministic job ids.

Sending is not a job: the delivery engine (`app/cascade/engine.py`) claims due messages
from Postgres in batches, and Redis only wakes it (`wake_key`). What stays here are the
side jobs (customer webhooks, withdrawing a send at the provider), whose deterministic ids
make a second enqueue of the same job a no-op while the first is queued or running.

After a commit, all the jobs it requested go to Redis in one round trip: one Lua script
call carries them all and runs, per job, the same check-and-add arq's `enqueue_job` does
(instead of WATCH/MULTI), so a batch of 1000 messages is one command, not 1000. That
leans on arq's internals (`serialize_job`, its key prefixes): pyproject pins arq to the
versions `test_enqueue_many_adds_each_new_job_once_as_arq_would` checks it against.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.exceptions import RedisError

from app.ids import IdPrefix, new_id, to_public
from providers.base import Category

log = structlog.get_logger()


def queue_name(category: Category | str) -> str:
    return f"cascade:{Category(category).value}"


def wake_key(category: Category | str) -> str:
    """The list a category's delivery engines block on between batches (`BLPOP`)."""
    return f"cascade:wake:{Category(category).value}"


@dataclass(frozen=True, slots=True)
class Job:
    function: str
    category: Category
    job_id: str
    args: tuple[Any, ...] = ()
    defer: timedelta | None = None
    # A queue of its own instead of the category's (webhooks: slow receivers never delay sends).
    queue: str | None = None
    defer_until: datetime | None = None


# Every job the app asks for, made here (the worker registers them by these names).

# Customer webhooks: a queue of their own, so slow receivers never delay the sends.
WEBHOOKS_QUEUE = "cascade:webhooks"


def dispatch_job(message_id: uuid.UUID, category: str) -> Job:
    # A fresh id per commit: a dispatch already running must not swallow later events.
    return Job(
        "dispatch_webhooks",
        Category(category),
        f"wh:dispatch:{message_id.hex}:{new_id().hex}",
        (to_public(IdPrefix.MESSAGE, message_id),),
        queue=WEBHOOKS_QUEUE,
    )


def deliver_job(
    delivery_id: uuid.UUID, attempt: int, category: str, defer: timedelta | None = None
) -> Job:
    # Deferred retries get ids of their own: a replay or a sweep asking for the same attempt
    # now must not collapse into a retry still waiting hours in the queue.
    return Job(
        "deliver_webhook",
        Category(category),
        f"wh:delivery:{delivery_id.hex}:{attempt}" + (":retry" if defer else ""),
        (to_public(IdPrefix.WEBHOOK_DELIVERY, delivery_id), attempt),
        defer,
        queue=WEBHOOKS_QUEUE,
    )


def cancel_provider_send_job(category: Category, provider: str, provider_message_id: str) -> Job:
    """Withdraw a send the cascade gave up on, where the provider can (see `Cancellable`)."""
    return Job(
        "cancel_provider_send",
        category,
        f"cancel:{provider}:{provider_message_id}",
        (provider, provider_message_id),
    )


# arq's enqueue_job check-and-add, for each job in turn: skip one whose id is queued,
# running or has a result. The jobs come as one argument (see `_JOB_HEADER`), not as
# 7 arguments each: redis-py packs a command's arguments one by one in Python, which
# cost more than everything else the enqueue did.
_ENQUEUE_IF_NEW = """
local jobs, job_prefix, result_prefix = ARGV[1], ARGV[2], ARGV[3]
-- ARGV[4..]: delivery engines to wake (a list each, holding at most one token)
for i = 4, #ARGV do
    redis.call('lpush', ARGV[i], '1')
    redis.call('ltrim', ARGV[i], 0, 0)
end
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
    if redis.call('exists', job_key, result_prefix .. id) == 0 then
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

    async def wait_for_wake(self, category: Category | str, seconds: float) -> None:
        """Block until the category's engines are woken (new work committed) or `seconds`
        pass. Redis unreachable: just the pause (the engines poll Postgres)."""
        try:
            # BLPOP takes fractional seconds (Redis >= 6); redis-py's stub says int.
            await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "BLPOP", wake_key(category), max(seconds, 0.001)
            )
        except (RedisError, OSError) as exc:
            log.warning("wake_wait_failed", error=repr(exc))
            await asyncio.sleep(seconds)

    async def enqueue(self, job: Job) -> None:
        await self.redis.enqueue_job(
            job.function,
            *job.args,
            _job_id=job.job_id,
            _queue_name=job.queue or queue_name(job.category),
            _defer_by=job.defer,
            _defer_until=job.defer_until,
        )

    async def enqueue_all(self, jobs: list[Job], wake: Sequence[str] = ()) -> None:
        """Enqueue after commit and wake the delivery engines of `wake` (categories), in one
        round trip. A Redis failure here loses nothing: the engines poll Postgres anyway,
        and the webhook sweep finds undispatched events."""
        if not jobs and not wake:
            return
        try:
            # Bounded: a hanging Redis must not hold the caller (a request, a batch) long.
            async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                await self.enqueue_many(jobs, [wake_key(c) for c in wake])
            return
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("enqueue_script_failed", jobs=len(jobs), error=repr(exc))
            if len(jobs) <= 1:
                return
        # One by one instead: arq's enqueue skips any the pipeline did add.
        for job in jobs:
            try:
                async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                    await self.enqueue(job)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("enqueue_failed", job_id=job.job_id, error=repr(exc))

    async def enqueue_many(self, jobs: list[Job], wake_keys: Sequence[str] = ()) -> int:
        """All `jobs` in one round trip (one script call per `SCRIPT_CHUNK` jobs, pipelined
        when there are more), waking the engines on `wake_keys`; returns how many were new."""
        if not jobs and not wake_keys:
            return 0
        now_ms = timestamp_ms()
        calls: list[list[bytes | str]] = [
            [self._packed(jobs[start : start + SCRIPT_CHUNK], now_ms), *_KEY_PREFIXES]
            for start in range(0, max(len(jobs), 1), SCRIPT_CHUNK)
        ]
        calls[0] += wake_keys
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
            payload = serialize_job(job.function, job.args, {}, None, now_ms, serializer=serializer)
            job_id = job.job_id.encode()
            queue = (job.queue or queue_name(job.category)).encode()
            expires = max(score - now_ms, 0) + expires_extra_ms
            header = _JOB_HEADER.pack(len(job_id), len(queue), len(payload), expires, score)
            parts += (header, job_id, queue, payload)
        return b"".join(parts)
