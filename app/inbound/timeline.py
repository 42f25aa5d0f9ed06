"""One recipient's history with a tenant: its messages to the address (with their
attempts) and the replies from it, merged newest first under one keyset cursor.

Both halves are index-backed and read at most a page (plus one) each: the messages from
the search index exactly as `GET /v1/messages?to=` finds them (`listing.search_rows`),
the replies from `inbound_messages_timeline` (tenant, address, received_at, id). The
cursor is the message search's (time, id): ids are UUIDv7 in both tables, so the pair
orders the merged list too.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from app.errors import FieldError, InvalidRequest
from app.ids import IdPrefix, to_public
from app.inbound.schemas import InboundItem, InboundView, OutboundItem, Timeline, TimelineItem
from app.inbound.tables import inbound_messages
from app.ledger.repository import AttemptRow
from app.ledger.tables import attempts
from app.messages.listing import (
    MessageFilter,
    normalised_address,
    search_rows,
    summary,
)
from app.messages.schemas import AttemptView
from app.messages.service import attempt_view
from app.pagination import decode_cursor, encode_cursor
from app.policy.service import normalise_address
from providers.base import Channel


def timeline_address(address: str, channel: Channel | None) -> str:
    """The address as stored: per the channel's rules when given (422 when it is not one
    of the channel's), else as the message search reads any address."""
    if channel is None:
        return normalised_address(address)
    try:
        return normalise_address(channel, address)
    except ValueError as exc:
        raise InvalidRequest(
            errors=[FieldError(path="path.address", message=str(exc), type="invalid_address")]
        ) from None


async def _replies(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    address: str,
    channel: Channel | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Any]:
    i = inbound_messages.c
    query = select(inbound_messages).where(i.tenant_id == tenant_id, i.address == address)
    if channel is not None:
        query = query.where(i.channel == channel.value)
    if after is not None:
        query = query.where(tuple_(i.received_at, i.id) < tuple_(*after))
    query = query.order_by(i.received_at.desc(), i.id.desc()).limit(limit + 1)
    return list(await conn.execute(query))


async def _attempts_of(
    conn: AsyncConnection, message_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[AttemptView]]:
    found: dict[uuid.UUID, list[AttemptView]] = defaultdict(list)
    if not message_ids:
        return found
    rows = await conn.execute(
        select(attempts)
        .where(attempts.c.message_id.in_(message_ids))
        .order_by(attempts.c.message_id, attempts.c.step)
    )
    for row in rows:
        found[row.message_id].append(attempt_view(AttemptRow(**row._mapping)))
    return found


def _inbound_view(row: Any) -> InboundView:
    return InboundView(
        id=to_public(IdPrefix.INBOUND, row.id),
        channel=row.channel,
        provider=row.provider,
        from_=row.address,
        to=row.to_address,
        text=row.text,
        in_reply_to=to_public(IdPrefix.MESSAGE, row.in_reply_to) if row.in_reply_to else None,
        said_at=row.said_at,
        received_at=row.received_at,
    )


async def recipient_timeline(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    address: str,
    channel: Channel | None,
    limit: int,
    cursor: str | None,
) -> Timeline:
    """One page, newest first; call it inside a transaction (the message search may steer
    the planner with SET LOCAL)."""
    address = timeline_address(address, channel)
    after = decode_cursor(cursor, "rcp", (datetime, uuid.UUID)) if cursor else None
    sent = await search_rows(
        conn, tenant_id, MessageFilter(to=address, to_channel=channel), limit, after
    )
    replies = await _replies(conn, tenant_id, address, channel, limit, after)
    merged: list[tuple[datetime, uuid.UUID, Any, bool]] = [
        *((row.created_at, row.id, row, True) for row in sent),
        *((row.received_at, row.id, row, False) for row in replies),
    ]
    merged.sort(key=lambda item: (item[0], item[1]), reverse=True)
    page = merged[:limit]
    attempts_by_message = await _attempts_of(conn, [row.id for _, _, row, out in page if out])
    data: list[TimelineItem] = [
        OutboundItem(
            type="message",
            at=at,
            message=summary(row),
            attempts=attempts_by_message.get(row.id, []),
        )
        if outbound
        else InboundItem(type="inbound", at=at, inbound=_inbound_view(row))
        for at, _, row, outbound in page
    ]
    more = len(merged) > limit
    return Timeline(
        address=address,
        channel=channel,
        data=data,
        next_cursor=encode_cursor("rcp", page[-1][0], page[-1][1]) if more and page else None,
    )
