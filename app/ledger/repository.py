"""SQL for the ledger: messages, attempts and the append-only event timeline.

Every function takes the open connection first and never commits.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Insert,
    Select,
    Update,
    and_,
    bindparam,
    exists,
    insert,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import ReturningInsert

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
    send_at: datetime | None = None
    expires_at: datetime | None = None
    not_before: datetime | None = None


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


@functools.cache
def _insert_accepted(columns: tuple[str, ...]) -> Insert:
    created = (
        insert(messages)
        .values({name: bindparam(f"v_{name}", type_=messages.c[name].type) for name in columns})
        .returning(messages.c.id, messages.c.category, messages.c.tenant_id, messages.c.created_at)
        .cte("created")
    )
    return insert(events).from_select(
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


async def insert_accepted_message(conn: AsyncConnection, values: dict[str, Any]) -> None:
    """The message row and its `accepted` event, in one statement (one round trip).

    The statement is built once per column set: a fresh one per message cost more CPU to
    build and cache-key than the round trip itself."""
    statement = _insert_accepted(tuple(sorted(values)))
    await conn.execute(statement, {f"v_{name}": value for name, value in values.items()})


# The hot statements are built once (per column set, for updates) with bind parameters:
# a statement built per call cost more CPU to construct and cache-key than to execute.
_GET_MESSAGE = select(messages).where(messages.c.id == bindparam("message_id"))
_GET_TENANT_MESSAGE = _GET_MESSAGE.where(messages.c.tenant_id == bindparam("tenant_id"))
_LOCK_MESSAGE = _GET_MESSAGE.with_for_update()
_GET_ATTEMPT = select(attempts).where(
    attempts.c.message_id == bindparam("message_id"), attempts.c.step == bindparam("step")
)
_EVENT_SEEN = select(events.c.id).where(events.c.dedupe_key == bindparam("dedupe_key"))
_EVENT_COLUMNS = (
    "message_id",
    "category",
    "tenant_id",
    "seq",
    "attempt_id",
    "step",
    "status",
    "source",
    "detail",
    "dedupe_key",
    "at",
)


@functools.cache
def _update_message(columns: tuple[str, ...]) -> Update:
    return (
        update(messages)
        .where(messages.c.id == bindparam("w_id"), messages.c.category == bindparam("w_category"))
        .values({name: bindparam(f"v_{name}", type_=messages.c[name].type) for name in columns})
    )


@functools.cache
def _update_attempt(columns: tuple[str, ...]) -> Update:
    return (
        update(attempts)
        .where(attempts.c.id == bindparam("w_id"))
        .values({name: bindparam(f"v_{name}", type_=attempts.c[name].type) for name in columns})
    )


@functools.cache
def _insert_attempt(columns: tuple[str, ...]) -> ReturningInsert[Any]:
    return (
        insert(attempts)
        .values({name: bindparam(f"v_{name}", type_=attempts.c[name].type) for name in columns})
        .returning(attempts)
    )


def _bound(values: dict[str, Any]) -> dict[str, Any]:
    return {f"v_{name}": value for name, value in values.items()}


async def get_message(
    conn: AsyncConnection, message_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> MessageRow | None:
    if tenant_id is None:
        result = await conn.execute(_GET_MESSAGE, {"message_id": message_id})
    else:
        result = await conn.execute(
            _GET_TENANT_MESSAGE, {"message_id": message_id, "tenant_id": tenant_id}
        )
    row = result.first()
    return _message(row) if row else None


async def lock_message(conn: AsyncConnection, message_id: uuid.UUID) -> MessageRow | None:
    """Serialises every change to one message: jobs and callbacks take this lock first."""
    row = (await conn.execute(_LOCK_MESSAGE, {"message_id": message_id})).first()
    return _message(row) if row else None


async def get_attempt(conn: AsyncConnection, message_id: uuid.UUID, step: int) -> AttemptRow | None:
    row = (await conn.execute(_GET_ATTEMPT, {"message_id": message_id, "step": step})).first()
    return _attempt(row) if row else None


async def list_attempts(conn: AsyncConnection, message_id: uuid.UUID) -> list[AttemptRow]:
    rows = await conn.execute(
        select(attempts).where(attempts.c.message_id == message_id).order_by(attempts.c.step)
    )
    return [_attempt(row) for row in rows]


def _attempt_match(by_id: bool) -> Any:
    match = attempts.c.provider == bindparam("provider")
    if by_id:
        return and_(match, attempts.c.id == bindparam("attempt_id"))
    return and_(match, attempts.c.provider_message_id == bindparam("provider_message_id"))


def _lock_message_of_attempt(by_id: bool) -> Select[Any]:
    owner = select(attempts.c.message_id, attempts.c.category).where(_attempt_match(by_id))
    owner = owner.limit(1)
    return (
        select(messages)
        .where(
            messages.c.id == owner.with_only_columns(attempts.c.message_id).scalar_subquery(),
            messages.c.category == owner.with_only_columns(attempts.c.category).scalar_subquery(),
        )
        .with_for_update()
    )


def _attempt_and_seen(by_id: bool) -> Select[Any]:
    seen = exists().where(events.c.dedupe_key == bindparam("dedupe_key")).label("seen")
    return select(attempts, seen).where(_attempt_match(by_id)).limit(1)


# Status reports name an attempt by our id or the provider's; a statement for each.
_LOCK_MESSAGE_OF_ATTEMPT = {by_id: _lock_message_of_attempt(by_id) for by_id in (True, False)}
_ATTEMPT_AND_SEEN = {by_id: _attempt_and_seen(by_id) for by_id in (True, False)}


def _attempt_key(
    provider: str, attempt_id: uuid.UUID | None, provider_message_id: str | None
) -> tuple[bool, dict[str, Any]] | None:
    if attempt_id is not None:
        return True, {"provider": provider, "attempt_id": attempt_id}
    if provider_message_id is not None:
        return False, {"provider": provider, "provider_message_id": provider_message_id}
    return None


async def lock_message_of_attempt(
    conn: AsyncConnection,
    provider: str,
    *,
    attempt_id: uuid.UUID | None,
    provider_message_id: str | None,
) -> MessageRow | None:
    """Find an attempt by our id or the provider's and lock its message (one query)."""
    key = _attempt_key(provider, attempt_id, provider_message_id)
    if key is None:
        return None
    row = (await conn.execute(_LOCK_MESSAGE_OF_ATTEMPT[key[0]], key[1])).first()
    return _message(row) if row else None


async def attempt_and_seen(
    conn: AsyncConnection,
    provider: str,
    dedupe_key: str,
    *,
    attempt_id: uuid.UUID | None,
    provider_message_id: str | None,
) -> tuple[AttemptRow | None, bool]:
    """The attempt, and whether an event with `dedupe_key` is in the ledger (one query)."""
    key = _attempt_key(provider, attempt_id, provider_message_id)
    if key is None:
        return None, False
    row = (
        await conn.execute(_ATTEMPT_AND_SEEN[key[0]], {**key[1], "dedupe_key": dedupe_key})
    ).first()
    if row is None:
        return None, await event_seen(conn, dedupe_key)
    data = dict(row._mapping)
    seen = bool(data.pop("seen"))
    data["status"] = AttemptStatus(data["status"])
    return AttemptRow(**data), seen


async def insert_attempt(conn: AsyncConnection, values: dict[str, Any]) -> AttemptRow:
    row = (await conn.execute(_insert_attempt(tuple(sorted(values))), _bound(values))).one()
    return _attempt(row)


async def update_attempt(
    conn: AsyncConnection, attempt: AttemptRow, at: datetime, **values: Any
) -> None:
    values["updated_at"] = at
    await conn.execute(
        _update_attempt(tuple(sorted(values))), {"w_id": attempt.id, **_bound(values)}
    )


@functools.cache
def _transition(
    event_count: int,
    message_columns: tuple[str, ...],
    attempt_columns: tuple[str, ...] | None,
    new_attempt_columns: tuple[str, ...] | None,
    also: Insert | None,
) -> Update:
    """One statement for one change: the attempt (inserted or updated), the events and
    the message, as data-modifying CTEs of the message's UPDATE. Built once per shape."""
    ctes: list[Any] = []
    if new_attempt_columns is not None:
        ctes.append(
            insert(attempts)
            .values({n: bindparam(f"n_{n}", type_=attempts.c[n].type) for n in new_attempt_columns})
            .cte("new_attempt")
        )
    if attempt_columns is not None:
        ctes.append(
            update(attempts)
            .where(attempts.c.id == bindparam("a_id"))
            .values({n: bindparam(f"a_{n}", type_=attempts.c[n].type) for n in attempt_columns})
            .cte("changed_attempt")
        )
    if event_count:
        # One INSERT … SELECT … UNION ALL: the rows (and their ids) keep `seq` order, which
        # separate CTEs would not (Postgres runs sibling CTEs in no guaranteed order).
        rows = [
            select(*(bindparam(f"e{i}_{n}", type_=events.c[n].type) for n in _EVENT_COLUMNS))
            for i in range(event_count)
        ]
        ctes.append(
            pg_insert(events)
            .from_select(_EVENT_COLUMNS, rows[0] if len(rows) == 1 else union_all(*rows))
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .cte("new_events")
        )
    if also is not None:
        ctes.append(also.cte("also"))
    statement = _update_message(message_columns)
    return statement.add_cte(*ctes) if ctes else statement


async def write_transition(
    conn: AsyncConnection,
    message: MessageRow,
    at: datetime,
    new_events: list[NewEvent],
    message_values: dict[str, Any],
    *,
    attempt: AttemptRow | None = None,
    attempt_values: dict[str, Any] | None = None,
    new_attempt: dict[str, Any] | None = None,
    also: tuple[Insert, dict[str, Any]] | None = None,
) -> None:
    """Write one state change in one round trip: insert or update the attempt, append
    `new_events` after the message's last sequence number, update the message, and run
    `also` (a statement built once, with its parameters; the stats rollup) with them.

    Callers hold the message lock, so sequence numbers are gap-free. An event whose
    `dedupe_key` exists is skipped (callers check `event_seen` under the lock first, so
    that is a safety net: the message's `seq` still advances past it, never onto it).
    """
    params: dict[str, Any] = {"w_id": message.id, "w_category": message.category}
    values = {**message_values, "seq": message.seq + len(new_events), "updated_at": at}
    params.update(_bound(values))
    attempt_columns = None
    if attempt is not None and attempt_values:
        changed = {**attempt_values, "updated_at": at}
        attempt_columns = tuple(sorted(changed))
        params["a_id"] = attempt.id
        params.update({f"a_{n}": v for n, v in changed.items()})
    new_attempt_columns = None
    if new_attempt is not None:
        new_attempt_columns = tuple(sorted(new_attempt))
        params.update({f"n_{n}": v for n, v in new_attempt.items()})
    for i, event in enumerate(new_events):
        params.update(
            {
                f"e{i}_message_id": message.id,
                f"e{i}_category": message.category,
                f"e{i}_tenant_id": message.tenant_id,
                f"e{i}_seq": message.seq + i + 1,
                f"e{i}_attempt_id": event.attempt_id,
                f"e{i}_step": event.step,
                f"e{i}_status": event.status,
                f"e{i}_source": event.source,
                f"e{i}_detail": event.detail,
                f"e{i}_dedupe_key": event.dedupe_key,
                f"e{i}_at": at,
            }
        )
    if also is not None:
        params.update(also[1])
    statement = _transition(
        len(new_events),
        tuple(sorted(values)),
        attempt_columns,
        new_attempt_columns,
        also[0] if also is not None else None,
    )
    await conn.execute(statement, params)


def new_attempt_row(values: dict[str, Any]) -> AttemptRow:
    """The row an attempt inserted with `values` reads back as."""
    return AttemptRow(
        **{
            "provider_message_id": None,
            "error_code": None,
            "error_detail": None,
            "sent_at": None,
            "completed_at": None,
            **values,
            "status": AttemptStatus(values["status"]),
        }
    )


async def event_seen(conn: AsyncConnection, dedupe_key: str) -> bool:
    row = (await conn.execute(_EVENT_SEEN, {"dedupe_key": dedupe_key})).first()
    return row is not None


async def list_events(conn: AsyncConnection, message_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.execute(
        select(events).where(events.c.message_id == message_id).order_by(events.c.seq)
    )
    return [dict(row._mapping) for row in rows]
