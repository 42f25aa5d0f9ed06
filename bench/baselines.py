"""The same-run baselines: what raw asyncpg (or bare arq) does with the same rows.

Each baseline writes exactly the rows the service writes for the same work, into the same
tables (so the same indexes, generated columns and triggers apply), at the same
concurrency, and is timed the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from app.ids import new_id
from bench.loadgen import RunResult

INSERT_ACCEPTED = """
WITH created AS (
    INSERT INTO messages (id, category, tenant_id, status, recipient, content, "cascade",
                          metadata, current_step, seq, created_at, updated_at)
    VALUES ($1, $2, $3, 'accepted', $4::jsonb, $5::jsonb, $6::jsonb, $7::jsonb, 0, 1, $8, $8)
    RETURNING id, category, tenant_id, created_at
)
INSERT INTO events (message_id, category, tenant_id, seq, status, source, at)
SELECT id, category, tenant_id, 1, 'accepted', 'api', created_at FROM created
"""

# What a delivered receipt writes: the attempt, the message, two timeline events.
APPLY_DELIVERED = """
WITH attempt AS (
    UPDATE attempts SET status = 'delivered', completed_at = $3, updated_at = $3
    WHERE id = $1 RETURNING message_id, category, step
), message AS (
    UPDATE messages m SET status = 'delivered', delivered_step = a.step,
        delivered_channel = 'push', completed_at = $3, updated_at = $3, seq = m.seq + 2
    FROM attempt a WHERE m.id = a.message_id AND m.category = a.category
    RETURNING m.id, m.category, m.tenant_id, m.seq
)
INSERT INTO events (message_id, category, tenant_id, seq, attempt_id, step, status, source,
                    dedupe_key, at)
SELECT id, category, tenant_id, seq - 1, $1, 0, 'delivered', 'provider', $2, $3 FROM message
UNION ALL
SELECT id, category, tenant_id, seq, NULL, NULL, 'delivered', 'provider', NULL, $3 FROM message
"""


async def timed_pool_run(
    dsn: str,
    concurrency: int,
    count: int,
    seconds: float,
    work: Callable[[asyncpg.Connection, int], Awaitable[None]],
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> RunResult:
    """`work(conn, index)` for up to `count` items, `concurrency` connections at a time."""
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency, init=init)
    assert pool is not None
    result = RunResult(0, 0.0)
    issued = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def drive() -> None:
        nonlocal issued
        async with pool.acquire() as conn:
            while issued < count and time.perf_counter() < deadline:
                index = issued
                issued += 1
                t0 = time.perf_counter()
                await work(conn, index)
                result.latencies.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(drive() for _ in range(concurrency)))
    finally:
        await pool.close()
    result.elapsed = time.perf_counter() - started
    result.requests = len(result.latencies)
    return result


def message_values(template: dict[str, Any], tenant_id: uuid.UUID, phone: str) -> tuple[Any, ...]:
    """A new message row like `template` (one the API wrote), to another phone number."""
    recipient = {**template["recipient"], "phone": phone}
    return (
        new_id(),
        template["category"],
        tenant_id,
        orjson.dumps(recipient).decode(),
        orjson.dumps(template["content"]).decode(),
        orjson.dumps(template["cascade"]).decode(),
        orjson.dumps(template["metadata"]).decode(),
        datetime.now(UTC),
    )


async def accept_baseline(
    dsn: str,
    template: dict[str, Any],
    tenant_id: uuid.UUID,
    phone: Callable[[int], str],
    *,
    concurrency: int,
    count: int,
    seconds: float,
) -> RunResult:
    async def insert(conn: asyncpg.Connection, index: int) -> None:
        await conn.execute(INSERT_ACCEPTED, *message_values(template, tenant_id, phone(index)))

    return await timed_pool_run(dsn, concurrency, count, seconds, insert)


MESSAGE_COLUMNS = [
    "id",
    "category",
    "tenant_id",
    "status",
    "recipient",
    "content",
    "cascade",
    "metadata",
    "current_step",
    "seq",
    "created_at",
    "updated_at",
]
EVENT_COLUMNS = ["message_id", "category", "tenant_id", "seq", "status", "source", "at"]


async def copy_baseline(
    dsn: str,
    template: dict[str, Any],
    tenant_id: uuid.UUID,
    phone: Callable[[int], str],
    *,
    batch: int,
    concurrency: int,
    count: int,
    seconds: float,
) -> RunResult:
    """`copy_records_to_table` of `batch` messages and their events, one transaction each."""

    async def copy(conn: asyncpg.Connection, index: int) -> None:
        at = datetime.now(UTC)
        messages = []
        for offset in range(batch):
            values = message_values(template, tenant_id, phone(index * batch + offset))
            messages.append((*values[:3], "accepted", *values[3:7], 0, 1, at, at))
        events = [(m[0], m[1], m[2], 1, "accepted", "api", at) for m in messages]
        async with conn.transaction():
            await conn.copy_records_to_table("messages", records=messages, columns=MESSAGE_COLUMNS)
            await conn.copy_records_to_table("events", records=events, columns=EVENT_COLUMNS)

    return await timed_pool_run(dsn, concurrency, count, seconds, copy)


async def callback_baseline(
    dsn: str, attempt_ids: list[uuid.UUID], *, concurrency: int, seconds: float
) -> RunResult:
    async def apply(conn: asyncpg.Connection, index: int) -> None:
        attempt_id = attempt_ids[index]
        dedupe = f"sandbox:sbx_att_{attempt_id.hex}:delivered"
        await conn.execute(APPLY_DELIVERED, attempt_id, dedupe, datetime.now(UTC))

    return await timed_pool_run(dsn, concurrency, len(attempt_ids), seconds, apply)
