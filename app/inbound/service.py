"""Replies: every text a recipient sends back through a provider's inbound webhook is
kept, per tenant it answers, and goes to that tenant's webhooks as `inbound.received`.

Which tenants a reply answers: provider accounts are shared between tenants and a reply
names no message, so, as STOP/START does (`app.policy.service.apply_inbound`, there over
the marketing send log), it goes to each tenant whose messages reached the sender: a
message whose recipient has the address in one of the channel's fields, with an attempt
on that channel the provider took (`sent_at` set), within `inbound_reply_window`. The
tenant's latest such message is the reply's `in_reply_to`. A reply that answers no one
is kept once, with no tenant, and shown to no one: a replay of it stays a replay.

A provider's redelivery of an event (same provider account and event id) is stored and
dispatched once; the first arrival decides which tenants it answers.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Text, cast, exists, func, insert, literal, literal_column, select
from sqlalchemy.dialects.postgresql import JSONB, distinct_on
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import Transaction
from app.ids import IdPrefix, new_id, to_public
from app.inbound.tables import inbound_messages
from app.ledger.tables import attempts, messages
from app.messages.listing import bitmap_scans_only, recipient_has
from app.policy.service import apply_inbound, normalise_address
from app.settings import Settings
from app.webhooks.events import inbound_event_data
from app.webhooks.service import InboundEvent, dispatch_inbound
from providers.base import Channel, InboundMessage


@dataclass(frozen=True, slots=True)
class Conversation:
    """A tenant's latest message that reached an address."""

    tenant_id: uuid.UUID
    message_id: uuid.UUID
    category: str


@dataclass(frozen=True, slots=True)
class StoredInbound:
    id: uuid.UUID
    tenant_id: uuid.UUID
    provider: str
    channel: Channel
    address: str
    to: str | None
    text: str
    in_reply_to: Conversation
    said_at: datetime
    received_at: datetime


def sender_address(channel: Channel, sender: str) -> str:
    """The sender as stored: normalised like suppressions; as given (trimmed) when it is
    not one (an alphanumeric SMS sender)."""
    try:
        return normalise_address(channel, sender)
    except ValueError:
        return sender.strip()


def conversations_query(channel: Channel, address: str, since: datetime) -> Any:
    m = messages.c
    search_doc = literal_column("messages.search_doc", JSONB)
    reached = exists().where(
        attempts.c.message_id == m.id,
        attempts.c.channel == channel.value,
        attempts.c.sent_at.is_not(None),
    )
    return (
        select(m.tenant_id, m.id, m.category)
        .where(
            # A text cast, not a jsonb bind: the same plan, and EXPLAIN-able with literals.
            search_doc.op("@>")(
                cast(literal(orjson.dumps({"to": [address]}).decode(), Text), JSONB)
            ),
            m.created_at >= since,
            recipient_has(channel, address),
            reached,
        )
        .ext(distinct_on(m.tenant_id))
        .order_by(m.tenant_id, m.created_at.desc(), m.id.desc())
    )


async def conversations(
    conn: AsyncConnection, channel: Channel, address: str, since: datetime
) -> list[Conversation]:
    """Per tenant, its latest message since `since` that reached `address` on `channel`.

    Every tenant's messages to the address come from the search index (`search_doc`,
    migration 0003), bitmap scans only: the planner would otherwise walk a tenant-ordered
    index for the DISTINCT ON, i.e. every message."""
    await bitmap_scans_only(conn, True)
    try:
        rows = list(await conn.execute(conversations_query(channel, address, since)))
    finally:
        await bitmap_scans_only(conn, False)
    return [Conversation(row.tenant_id, row.id, row.category) for row in rows]


def _lock_id(provider: str, event_id: str) -> int:
    digest = hashlib.sha256(f"inbound-event\n{provider}\n{event_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def record_inbound(
    tx: Transaction, provider: str, inbound: InboundMessage, settings: Settings, at: datetime
) -> list[StoredInbound]:
    """Store a reply once per tenant it answers (nothing for a redelivery); returns the
    rows stored for tenants."""
    i = inbound_messages.c
    # Two deliveries of one event at once: the second waits, then finds the first's rows.
    await tx.conn.execute(select(func.pg_advisory_xact_lock(_lock_id(provider, inbound.event_id))))
    seen = await tx.conn.scalar(
        select(exists().where(i.provider == provider, i.event_id == inbound.event_id))
    )
    if seen:
        return []
    address = sender_address(inbound.channel, inbound.sender)
    # As for STOP/START: a provider clock ahead of ours never dates a reply in the future.
    said_at = min(inbound.sent_at, at) if inbound.sent_at is not None else at
    answered = await conversations(
        tx.conn, inbound.channel, address, at - settings.inbound_reply_window
    )
    common = {
        "provider": provider,
        "event_id": inbound.event_id,
        "channel": inbound.channel.value,
        "address": address,
        "to_address": inbound.to,
        "text": inbound.text,
        "said_at": said_at,
        "received_at": at,
    }
    stored = [
        StoredInbound(
            id=new_id(),
            tenant_id=c.tenant_id,
            provider=provider,
            channel=inbound.channel,
            address=address,
            to=inbound.to,
            text=inbound.text,
            in_reply_to=c,
            said_at=said_at,
            received_at=at,
        )
        for c in answered
    ]
    rows = [
        {**common, "id": s.id, "tenant_id": s.tenant_id, "in_reply_to": s.in_reply_to.message_id}
        for s in stored
    ] or [{**common, "id": new_id(), "tenant_id": None, "in_reply_to": None}]
    await tx.conn.execute(insert(inbound_messages), rows)
    return stored


def inbound_event(stored: StoredInbound) -> InboundEvent:
    return InboundEvent(
        inbound_id=stored.id,
        tenant_id=stored.tenant_id,
        message_id=stored.in_reply_to.message_id,
        category=stored.in_reply_to.category,
        received_at=stored.received_at,
        data=inbound_event_data(
            inbound_id=to_public(IdPrefix.INBOUND, stored.id),
            channel=stored.channel.value,
            provider=stored.provider,
            sender=stored.address,
            to=stored.to,
            text=stored.text,
            received_at=stored.received_at,
            said_at=stored.said_at,
            in_reply_to=to_public(IdPrefix.MESSAGE, stored.in_reply_to.message_id),
        ),
    )


async def receive_all(
    tx: Transaction,
    provider: str,
    inbound: Sequence[InboundMessage],
    settings: Settings,
    clock: Callable[[], datetime],
) -> int:
    """Keep each reply (`receive`) and apply its STOP/START; returns how many tenants'
    suppressions it changed."""
    changed = 0
    for message in inbound:
        at = clock()
        await receive(tx, provider, message, settings, at)
        changed += await apply_inbound(tx, provider, message, settings, at)
    return changed


async def receive(
    tx: Transaction, provider: str, inbound: InboundMessage, settings: Settings, at: datetime
) -> int:
    """Store a reply and make its webhook deliveries; returns how many tenants it answers."""
    stored = await record_inbound(tx, provider, inbound, settings, at)
    for row in stored:
        await dispatch_inbound(tx, inbound_event(row), at)
    return len(stored)
