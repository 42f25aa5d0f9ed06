"""SQL for the ledger: messages, attempts and the append-only event timeline.

Every function takes the open connection first and never commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.cascade.machine import AttemptStatus, MessageStatus
from app.ledger.tables import attempts, events, messages


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: uuid.UUID
    category: str
    tenant_id: uuid.UUID
    status: MessageStatus
    recipient: dict[str, Any]
    content: dict[str, Any]
    cascade: list[dict[str, Any]]
    metadata: dict[str, Any]
    current_step: int
    delivered_step: int | None
    delivered_channel: str | None
    seq: int
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class AttemptRow:
    id: uuid.UUID
    message_id: uuid.UUID
    category: str
    step: int
    channel: str
    provider: str
    status: AttemptStatus
    provider_message_id: str | None
    error_code: str | None
    error_detail: str | None
    tries: int
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    completed_at: datetime | None
    deadline_at: datetime


@dataclass(frozen=True, slots=True)
class NewEvent:
    status: str
    source: str
    attempt_id: uuid.UUID | None = None
    step: int | None = None
    detail: dict[str, Any] | None = None
    dedupe_key: str | None = None


def _message(row: Any) -> MessageRow:
    data = dict(row._mapping)
    data["status"] = MessageStatus(data["status"])
    return MessageRow(**data)


def _attempt(row: Any) -> AttemptRow:
    data = dict(row._mapping)
    data["status"] = AttemptStatus(data["status"])
    return AttemptRow(**data)


async def insert_accepted_message(conn: AsyncConnection, values: dict[str, Any]) -> None:
    """The message row and its `accepted` event, in one statement (one round trip)."""
    created = (
        insert(messages)
        .values(**values)
        .returning(messages.c.id, messages.c.category, messages.c.tenant_id, messages.c.created_at)
        .cte("created")
    )
    await conn.execute(
        insert(events).from_select(
            ["message_id", "category", "tenant_id", "seq", "status", "source", "at"],
            select(
                created.c.id,
                created.c.category,
                created.c.tenant_id,
                literal(1),
                literal(MessageStatus.ACCEPTED.value),
                literal("api"),
                created.c.created_at,
            ),
        )
    )


async def get_message(
    conn: AsyncConnection, message_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> MessageRow | None:
    query = select(messages).where(messages.c.id == message_id)
    if tenant_id is not None:
        query = query.where(messages.c.tenant_id == tenant_id)
    row = (await conn.execute(query)).first()
    return _message(row) if row else None


async def lock_message(conn: AsyncConnection, message_id: uuid.UUID) -> MessageRow | None:
    """Serialises every change to one message: jobs and callbacks take this lock first."""
    row = (
        await conn.execute(select(messages).where(messages.c.id == message_id).with_for_update())
    ).first()
    return _message(row) if row else None


async def update_message(
    conn: AsyncConnection, message: MessageRow, at: datetime, **values: Any
) -> None:
    await conn.execute(
        update(messages)
        .where(messages.c.id == message.id, messages.c.category == message.category)
        .values(updated_at=at, **values)
    )


async def get_attempt(conn: AsyncConnection, message_id: uuid.UUID, step: int) -> AttemptRow | None:
    row = (
        await conn.execute(
            select(attempts).where(attempts.c.message_id == message_id, attempts.c.step == step)
        )
    ).first()
    return _attempt(row) if row else None


async def list_attempts(conn: AsyncConnection, message_id: uuid.UUID) -> list[AttemptRow]:
    rows = await conn.execute(
        select(attempts).where(attempts.c.message_id == message_id).order_by(attempts.c.step)
    )
    return [_attempt(row) for row in rows]


async def find_attempt(
    conn: AsyncConnection,
    provider: str,
    *,
    attempt_id: uuid.UUID | None,
    provider_message_id: str | None,
) -> AttemptRow | None:
    query = select(attempts).where(attempts.c.provider == provider)
    if attempt_id is not None:
        query = query.where(attempts.c.id == attempt_id)
    elif provider_message_id is not None:
        query = query.where(attempts.c.provider_message_id == provider_message_id)
    else:
        return None
    row = (await conn.execute(query.limit(1))).first()
    return _attempt(row) if row else None


async def insert_attempt(conn: AsyncConnection, values: dict[str, Any]) -> AttemptRow:
    row = (await conn.execute(insert(attempts).values(**values).returning(attempts))).one()
    return _attempt(row)


async def update_attempt(
    conn: AsyncConnection, attempt: AttemptRow, at: datetime, **values: Any
) -> None:
    await conn.execute(
        update(attempts).where(attempts.c.id == attempt.id).values(updated_at=at, **values)
    )


async def append_events(
    conn: AsyncConnection, message: MessageRow, new: list[NewEvent], at: datetime
) -> int:
    """Append events after the message's last sequence number; returns how many were new.

    Callers hold the message lock, so sequence numbers are gap-free per message; an event
    whose `dedupe_key` was seen before is skipped.
    """
    added = 0
    for event in new:
        statement = (
            pg_insert(events)
            .values(
                message_id=message.id,
                category=message.category,
                tenant_id=message.tenant_id,
                seq=message.seq + added + 1,
                attempt_id=event.attempt_id,
                step=event.step,
                status=event.status,
                source=event.source,
                detail=event.detail,
                dedupe_key=event.dedupe_key,
                at=at,
            )
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(events.c.id)
        )
        if (await conn.execute(statement)).first() is not None:
            added += 1
    return added


async def event_seen(conn: AsyncConnection, dedupe_key: str) -> bool:
    row = (await conn.execute(select(events.c.id).where(events.c.dedupe_key == dedupe_key))).first()
    return row is not None


async def list_events(conn: AsyncConnection, message_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.execute(
        select(events).where(events.c.message_id == message_id).order_by(events.c.seq)
    )
    return [dict(row._mapping) for row in rows]
