"""A tenant's ledger events as a feed to poll with a cursor (`cascade tail`).

Event ids come from a sequence, so a transaction that commits late can hold a smaller id
than one already read. The feed therefore only hands out events older than `SETTLE`,
stopping at the first younger one: a reader never moves its cursor past an event that
may still be in flight. It is a live view for people; webhooks are the durable feed.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from itertools import takewhile
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.ids import IdPrefix, to_public
from app.ledger.tables import attempts, events
from app.ops.events.schemas import EventPage, FeedEvent
from app.pagination import decode_cursor, encode_cursor

SETTLE = timedelta(seconds=1)
# Events examined per poll: bounds the work when filters match little.
SCAN = 1000


def event_cursor(event_id: int) -> str:
    return encode_cursor("evt", event_id)


def _view(row: Any) -> FeedEvent:
    return FeedEvent(
        cursor=event_cursor(row.id),
        message_id=to_public(IdPrefix.MESSAGE, row.message_id),
        category=row.category,
        seq=row.seq,
        at=row.at,
        status=row.status,
        source=row.source,
        step=row.step,
        channel=row.channel,
        provider=row.provider,
        attempt=to_public(IdPrefix.ATTEMPT, row.attempt_id) if row.attempt_id else None,
        detail=row.detail,
    )


async def read_feed(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    *,
    cursor: str | None,
    limit: int,
    categories: Collection[str],
    statuses: Collection[str],
    now: datetime,
) -> EventPage:
    """Events after the cursor (oldest first), or without one the latest `limit`."""
    e = events.c
    query = (
        select(
            e.id,
            e.message_id,
            e.category,
            e.seq,
            e.at,
            e.status,
            e.source,
            e.step,
            e.detail,
            e.attempt_id,
            attempts.c.channel,
            attempts.c.provider,
        )
        .select_from(events.outerjoin(attempts, attempts.c.id == e.attempt_id))
        .where(e.tenant_id == tenant_id)
    )
    start = decode_cursor(cursor, "evt", (int,))[0] if cursor else None
    if start is not None:
        query = query.where(e.id > start).order_by(e.id).limit(SCAN)
        rows = list(await conn.execute(query))
    else:
        rows = list(await conn.execute(query.order_by(e.id.desc()).limit(SCAN)))[::-1]
    settled = list(takewhile(lambda row: row.at < now - SETTLE, rows))
    matching = [
        row
        for row in settled
        if (not categories or row.category in categories)
        and (not statuses or row.status in statuses)
    ]
    if start is not None:
        page = matching[:limit]
        full = len(page) == limit
        last = page[-1].id if full else (settled[-1].id if settled else start)
    else:
        page = matching[-limit:]
        last = settled[-1].id if settled else None
    return EventPage(
        data=[_view(row) for row in page],
        next_cursor=event_cursor(last) if last is not None else None,
    )
