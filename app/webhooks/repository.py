"""SQL for webhook endpoints, events, deliveries and dispatch cursors.

Every function takes the open connection first and never commits. Tenant-facing reads
take the tenant id, so another tenant's ids simply do not exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.ledger.tables import attempts, events
from app.webhooks.events import Subscription
from app.webhooks.tables import (
    webhook_cursors,
    webhook_deliveries,
    webhook_endpoints,
    webhook_events,
    webhook_sweep_mark,
)


class DeliveryStatus:
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class EndpointRow:
    id: uuid.UUID
    tenant_id: uuid.UUID
    url: str
    description: str
    event_types: list[str] | None
    categories: list[str] | None
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    failing_since: datetime | None
    disabled_at: datetime | None
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def subscription(self) -> Subscription:
        return Subscription(
            frozenset(self.event_types) if self.event_types is not None else None,
            frozenset(self.categories) if self.categories is not None else None,
        )

    def signing_keys(self, at: datetime) -> list[str]:
        return signing_keys(self.secret, self.previous_secret, self.previous_secret_expires_at, at)


def signing_keys(
    secret: str, previous: str | None, previous_expires_at: datetime | None, at: datetime
) -> list[str]:
    """The current secret, plus the previous one during its overlap after a rotation."""
    if previous and previous_expires_at and at < previous_expires_at:
        return [secret, previous]
    return [secret]


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: uuid.UUID
    tenant_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    status: str
    attempts: int
    schedule_start: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    response_status: int | None
    response_body: str | None
    latency_ms: int | None
    error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryLogRow:
    delivery: DeliveryRow
    event_type: str
    message_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    id: int
    seq: int
    status: str
    attempt_id: uuid.UUID | None
    step: int | None
    detail: dict[str, Any] | None
    at: datetime
    channel: str | None
    provider: str | None


def _endpoint(row: Any) -> EndpointRow:
    return EndpointRow(**dict(row._mapping))


def _delivery(row: Any) -> DeliveryRow:
    return DeliveryRow(**{c.name: row._mapping[c.name] for c in webhook_deliveries.c})


# Endpoints


async def count_endpoints(conn: AsyncConnection, tenant_id: uuid.UUID) -> int:
    query = select(func.count()).where(webhook_endpoints.c.tenant_id == tenant_id)
    return int((await conn.execute(query)).scalar_one())


async def insert_endpoint(conn: AsyncConnection, values: dict[str, Any]) -> EndpointRow:
    row = (
        await conn.execute(insert(webhook_endpoints).values(**values).returning(webhook_endpoints))
    ).one()
    return _endpoint(row)


async def get_endpoint(
    conn: AsyncConnection, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, *, lock: bool = False
) -> EndpointRow | None:
    query = select(webhook_endpoints).where(
        webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.tenant_id == tenant_id
    )
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    return _endpoint(row) if row else None


async def list_endpoints(conn: AsyncConnection, tenant_id: uuid.UUID) -> list[EndpointRow]:
    rows = await conn.execute(
        select(webhook_endpoints)
        .where(webhook_endpoints.c.tenant_id == tenant_id)
        .order_by(webhook_endpoints.c.id)
    )
    return [_endpoint(row) for row in rows]


async def enabled_endpoints(conn: AsyncConnection, tenant_id: uuid.UUID) -> list[EndpointRow]:
    rows = await conn.execute(
        select(webhook_endpoints).where(
            webhook_endpoints.c.tenant_id == tenant_id, webhook_endpoints.c.disabled_at.is_(None)
        )
    )
    return [_endpoint(row) for row in rows]


async def has_enabled_endpoint(conn: AsyncConnection, tenant_id: uuid.UUID) -> bool:
    query = select(
        select(webhook_endpoints.c.id)
        .where(
            webhook_endpoints.c.tenant_id == tenant_id,
            webhook_endpoints.c.disabled_at.is_(None),
        )
        .exists()
    )
    return bool((await conn.execute(query)).scalar_one())


async def update_endpoint(
    conn: AsyncConnection, endpoint_id: uuid.UUID, at: datetime, **values: Any
) -> EndpointRow:
    row = (
        await conn.execute(
            update(webhook_endpoints)
            .where(webhook_endpoints.c.id == endpoint_id)
            .values(updated_at=at, **values)
            .returning(webhook_endpoints)
        )
    ).one()
    return _endpoint(row)


async def delete_endpoint(
    conn: AsyncConnection, tenant_id: uuid.UUID, endpoint_id: uuid.UUID
) -> bool:
    result = await conn.execute(
        delete(webhook_endpoints)
        .where(webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.tenant_id == tenant_id)
        .returning(webhook_endpoints.c.id)
    )
    return result.first() is not None


async def clear_failing(conn: AsyncConnection, endpoint_id: uuid.UUID) -> None:
    await conn.execute(
        update(webhook_endpoints)
        .where(
            webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.failing_since.is_not(None)
        )
        .values(failing_since=None)
    )


async def disable_endpoint(
    conn: AsyncConnection, endpoint_id: uuid.UUID, at: datetime, reason: str
) -> bool:
    result = await conn.execute(
        update(webhook_endpoints)
        .where(webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.disabled_at.is_(None))
        .values(disabled_at=at, disabled_reason=reason, updated_at=at)
        .returning(webhook_endpoints.c.id)
    )
    return result.first() is not None


async def fail_pending_deliveries(
    conn: AsyncConnection, endpoint_id: uuid.UUID, at: datetime, error: str
) -> int:
    """Give up the endpoint's pending deliveries. Rows an in-flight attempt holds are
    skipped (no lock waits, so no deadlock): that attempt fails them when it records."""
    pending = (
        select(webhook_deliveries.c.id)
        .where(
            webhook_deliveries.c.endpoint_id == endpoint_id,
            webhook_deliveries.c.status == DeliveryStatus.PENDING,
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = await conn.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.id.in_(pending))
        .values(status=DeliveryStatus.FAILED, next_attempt_at=None, error=error, updated_at=at)
    )
    return int(result.rowcount)


# Dispatch


async def lock_cursor(conn: AsyncConnection, message_id: uuid.UUID, at: datetime) -> int:
    """The message's dispatch cursor, created if new and locked (one statement): one
    dispatcher per message at a time."""
    insert_or_lock = (
        pg_insert(webhook_cursors)
        .values(message_id=message_id, seq=0, updated_at=at)
        .on_conflict_do_update(index_elements=["message_id"], set_={"seq": webhook_cursors.c.seq})
        .returning(webhook_cursors.c.seq)
    )
    return int((await conn.execute(insert_or_lock)).scalar_one())


async def advance_cursor(
    conn: AsyncConnection, message_id: uuid.UUID, seq: int, at: datetime
) -> None:
    await conn.execute(
        update(webhook_cursors)
        .where(webhook_cursors.c.message_id == message_id)
        .values(seq=seq, updated_at=at)
    )


async def ledger_events_after(
    conn: AsyncConnection, message_id: uuid.UUID, seq: int
) -> list[LedgerEvent]:
    """The message's events after `seq`, with the channel and provider of their attempt."""
    rows = await conn.execute(
        select(
            events.c.id,
            events.c.seq,
            events.c.status,
            events.c.attempt_id,
            events.c.step,
            events.c.detail,
            events.c.at,
            attempts.c.channel,
            attempts.c.provider,
        )
        .outerjoin(attempts, attempts.c.id == events.c.attempt_id)
        .where(events.c.message_id == message_id, events.c.seq > seq)
        .order_by(events.c.seq)
    )
    return [LedgerEvent(**dict(row._mapping)) for row in rows]


async def insert_event(conn: AsyncConnection, values: dict[str, Any]) -> uuid.UUID:
    """The webhook event for one ledger event or inbound message (the existing one if
    already made)."""
    key = "ledger_event_id" if values.get("ledger_event_id") is not None else "inbound_id"
    created = (
        await conn.execute(
            pg_insert(webhook_events)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[key])
            .returning(webhook_events.c.id)
        )
    ).first()
    if created is not None:
        return created[0]  # type: ignore[no-any-return]
    existing = await conn.execute(
        select(webhook_events.c.id).where(webhook_events.c[key] == values[key])
    )
    return existing.scalar_one()  # type: ignore[no-any-return]


async def insert_delivery(conn: AsyncConnection, values: dict[str, Any]) -> uuid.UUID | None:
    """A new pending delivery, or None when this endpoint already has one for the event."""
    created = (
        await conn.execute(
            pg_insert(webhook_deliveries)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["endpoint_id", "event_id"])
            .returning(webhook_deliveries.c.id)
        )
    ).first()
    return created[0] if created else None


# Deliveries


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: uuid.UUID
    tenant_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    attempts: int
    schedule_start: int
    url: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    payload: str
    category: str

    def signing_keys(self, at: datetime) -> list[str]:
        return signing_keys(self.secret, self.previous_secret, self.previous_secret_expires_at, at)


async def claim_delivery(
    conn: AsyncConnection,
    delivery_id: uuid.UUID,
    attempt: int,
    at: datetime,
    due_by: datetime,
    lease_until: datetime,
) -> ClaimedDelivery | None:
    """Take attempt `attempt + 1` in one statement: only if the delivery is pending, still
    at `attempt` attempts, due by `due_by`, and its endpoint is enabled. Concurrent claims
    of the same attempt serialise on the row and all but one match nothing."""
    d, e, ev = webhook_deliveries, webhook_endpoints, webhook_events
    statement = (
        update(d)
        .where(
            d.c.id == delivery_id,
            d.c.status == DeliveryStatus.PENDING,
            d.c.attempts == attempt,
            (d.c.next_attempt_at.is_(None)) | (d.c.next_attempt_at <= due_by),
            e.c.id == d.c.endpoint_id,
            e.c.disabled_at.is_(None),
            ev.c.id == d.c.event_id,
        )
        .values(
            attempts=d.c.attempts + 1,
            next_attempt_at=lease_until,
            last_attempt_at=at,
            updated_at=at,
        )
        .returning(
            d.c.id,
            d.c.tenant_id,
            d.c.endpoint_id,
            d.c.event_id,
            d.c.attempts,
            d.c.schedule_start,
            e.c.url,
            e.c.secret,
            e.c.previous_secret,
            e.c.previous_secret_expires_at,
            ev.c.payload,
            ev.c.category,
        )
    )
    row = (await conn.execute(statement)).first()
    return ClaimedDelivery(**dict(row._mapping)) if row else None


async def fail_if_endpoint_disabled(
    conn: AsyncConnection, delivery_id: uuid.UUID, at: datetime
) -> None:
    """A pending delivery whose endpoint was disabled meanwhile will never be sent."""
    d, e = webhook_deliveries, webhook_endpoints
    await conn.execute(
        update(d)
        .where(
            d.c.id == delivery_id,
            d.c.status == DeliveryStatus.PENDING,
            e.c.id == d.c.endpoint_id,
            e.c.disabled_at.is_not(None),
        )
        .values(
            status=DeliveryStatus.FAILED,
            next_attempt_at=None,
            error="endpoint disabled",
            updated_at=at,
        )
    )


async def record_attempt(
    conn: AsyncConnection, delivery_id: uuid.UUID, attempts: int, at: datetime, **values: Any
) -> bool:
    """Store an attempt's result, unless the delivery has moved on since it was claimed."""
    result = await conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.id == delivery_id,
            webhook_deliveries.c.status == DeliveryStatus.PENDING,
            webhook_deliveries.c.attempts == attempts,
        )
        .values(updated_at=at, **values)
        .returning(webhook_deliveries.c.id)
    )
    return result.first() is not None


async def record_failing(
    conn: AsyncConnection, endpoint_id: uuid.UUID, at: datetime
) -> tuple[datetime | None, datetime | None]:
    """Start the failing streak if none runs; returns (failing_since, disabled_at)."""
    row = (
        await conn.execute(
            update(webhook_endpoints)
            .where(webhook_endpoints.c.id == endpoint_id)
            .values(failing_since=func.coalesce(webhook_endpoints.c.failing_since, at))
            .returning(webhook_endpoints.c.failing_since, webhook_endpoints.c.disabled_at)
        )
    ).first()
    return (row[0], row[1]) if row else (None, at)


async def lock_delivery(
    conn: AsyncConnection, delivery_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> DeliveryRow | None:
    query = select(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
    if tenant_id is not None:
        query = query.where(webhook_deliveries.c.tenant_id == tenant_id)
    row = (await conn.execute(query.with_for_update())).first()
    return _delivery(row) if row else None


async def update_delivery(
    conn: AsyncConnection, delivery_id: uuid.UUID, at: datetime, **values: Any
) -> None:
    await conn.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.id == delivery_id)
        .values(updated_at=at, **values)
    )


async def requeue_since(
    conn: AsyncConnection,
    endpoint_id: uuid.UUID,
    since: datetime,
    at: datetime,
    *,
    failed_only: bool,
) -> list[tuple[uuid.UUID, int, str]]:
    """Deliveries created since `since` back to pending on a fresh schedule: every finished
    one (replay), or only the failed ones (recover). Pending ones are already scheduled."""
    finished = (
        [DeliveryStatus.FAILED]
        if failed_only
        else [DeliveryStatus.FAILED, DeliveryStatus.SUCCEEDED]
    )
    rows = await conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.endpoint_id == endpoint_id,
            webhook_deliveries.c.status.in_(finished),
            webhook_deliveries.c.created_at >= since,
        )
        .values(
            status=DeliveryStatus.PENDING,
            schedule_start=webhook_deliveries.c.attempts,
            next_attempt_at=at,
            updated_at=at,
        )
        .returning(
            webhook_deliveries.c.id,
            webhook_deliveries.c.attempts,
            select(webhook_events.c.category)
            .where(webhook_events.c.id == webhook_deliveries.c.event_id)
            .scalar_subquery(),
        )
    )
    return [(row[0], row[1], row[2]) for row in rows]


async def delivery_log(
    conn: AsyncConnection,
    endpoint_id: uuid.UUID,
    *,
    status: str | None,
    before: uuid.UUID | None,
    limit: int,
) -> list[DeliveryLogRow]:
    query = (
        select(webhook_deliveries, webhook_events.c.type, webhook_events.c.message_id)
        .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        .where(webhook_deliveries.c.endpoint_id == endpoint_id)
        .order_by(webhook_deliveries.c.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(webhook_deliveries.c.status == status)
    if before is not None:
        query = query.where(webhook_deliveries.c.id < before)
    rows = await conn.execute(query)
    return [DeliveryLogRow(_delivery(row), row.type, row.message_id) for row in rows]


async def overdue_deliveries(
    conn: AsyncConnection, before: datetime, limit: int
) -> list[tuple[uuid.UUID, int, str]]:
    rows = await conn.execute(
        select(webhook_deliveries.c.id, webhook_deliveries.c.attempts, webhook_events.c.category)
        .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        .where(
            webhook_deliveries.c.status == DeliveryStatus.PENDING,
            webhook_deliveries.c.next_attempt_at < before,
        )
        .order_by(webhook_deliveries.c.next_attempt_at)
        .limit(limit)
    )
    return [(row[0], row[1], row[2]) for row in rows]


# Sweep over the ledger


async def lock_sweep_mark(conn: AsyncConnection) -> int:
    query = select(webhook_sweep_mark.c.event_id).with_for_update()
    value = (await conn.execute(query)).scalar_one_or_none()
    if value is None:
        await conn.execute(insert(webhook_sweep_mark).values(singleton=True, event_id=0))
        return 0
    return int(value)


async def set_sweep_mark(conn: AsyncConnection, event_id: int) -> None:
    await conn.execute(update(webhook_sweep_mark).values(event_id=event_id))


async def last_settled_event(conn: AsyncConnection, after: int, before: datetime) -> int | None:
    """The highest ledger event id past `after` written before `before` (a backward index
    scan over only the youngest events)."""
    query = (
        select(events.c.id)
        .where(events.c.id > after, events.c.at < before)
        .order_by(events.c.id.desc())
        .limit(1)
    )
    value = (await conn.execute(query)).scalar_one_or_none()
    return int(value) if value is not None else None


async def undispatched_messages(
    conn: AsyncConnection, after: int, upto: int, limit: int
) -> list[uuid.UUID]:
    """Messages with an event in (after, upto] that a tenant with an enabled endpoint owns
    and the message's dispatch cursor has not reached. Filtered in the database: the
    range holds every tenant's events."""
    watched = (
        select(webhook_endpoints.c.id)
        .where(
            webhook_endpoints.c.tenant_id == events.c.tenant_id,
            webhook_endpoints.c.disabled_at.is_(None),
        )
        .exists()
    )
    dispatched = (
        select(webhook_cursors.c.message_id)
        .where(
            webhook_cursors.c.message_id == events.c.message_id,
            webhook_cursors.c.seq >= events.c.seq,
        )
        .exists()
    )
    rows = await conn.execute(
        select(events.c.message_id)
        .where(events.c.id > after, events.c.id <= upto, watched, ~dispatched)
        .distinct()
        .limit(limit)
    )
    return [row[0] for row in rows]


async def event_category(conn: AsyncConnection, event_id: uuid.UUID) -> str:
    query = select(webhook_events.c.category).where(webhook_events.c.id == event_id)
    return str((await conn.execute(query)).scalar_one())
