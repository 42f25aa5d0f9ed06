"""Searching a tenant's messages: filters, newest first, keyset cursor over (created_at, id).

Every filter maps onto an index (migration 0003): the tenant's (created_at, id) and
(status, created_at, id) btrees, and one GIN index over `messages.search_doc`, a generated
jsonb document of each message's normalised addresses, cascade providers and metadata.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import phonenumbers
from sqlalchemy import func, literal, literal_column, or_, select, text, true, tuple_
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from app.cascade.machine import UNSUCCESSFUL_ATTEMPT, MessageStatus
from app.errors import FieldError, InvalidRequest
from app.ids import IdPrefix, to_public
from app.ledger.tables import attempts, messages
from app.messages.schemas import LastErrorView, MessagePage, MessageSummary
from app.pagination import decode_cursor, encode_cursor
from app.policy.service import RECIPIENT_FIELDS
from providers.base import Category, Channel

MAX_LIMIT = 200
# Up to this many matches, a to/provider/metadata filter is answered from the GIN index alone.
FEW_MATCHES = 5_000


@dataclass(frozen=True, slots=True)
class MessageFilter:
    statuses: tuple[MessageStatus, ...] = ()
    category: Category | None = None
    delivered_channel: Channel | None = None
    provider: str | None = None
    to: str | None = None
    # `to` only in this channel's recipient fields (a phone as `phone` for sms, not as
    # `whatsapp`); None: in any of them.
    to_channel: Channel | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def normalised_address(raw: str) -> str:
    """The stored form of an address: E.164 phones, lower-case emails, anything else as is."""
    value = raw.strip()
    if "@" in value:
        return value.lower()
    if value.startswith("+"):
        try:
            number = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException:
            return value
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return value


def parse_metadata_filters(pairs: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for index, pair in enumerate(pairs):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(
                "metadata filters are `key=value`",
                [
                    FieldError(
                        path=f"query.metadata[{index}]", message="expected key=value", type="format"
                    )
                ],
            )
        parsed[key] = value
    return parsed


def _search_doc(wanted: MessageFilter) -> dict[str, Any]:
    """What `messages.search_doc` (migration 0003) must contain for a match."""
    doc: dict[str, Any] = {}
    if wanted.to is not None:
        doc["to"] = [normalised_address(wanted.to)]
    if wanted.provider is not None:
        doc["provider"] = [wanted.provider]
    if wanted.metadata:
        doc["metadata"] = dict(wanted.metadata)
    return doc


def recipient_has(channel: Channel, address: str) -> ColumnElement[bool]:
    """The message's recipient has `address` (normalised) in one of `channel`'s fields."""
    m = messages.c
    return or_(
        *(
            (func.lower(m.recipient[name].astext) if name == "email" else m.recipient[name].astext)
            == address
            for name in RECIPIENT_FIELDS[channel]
        )
    )


def _conditions(
    tenant_id: uuid.UUID, wanted: MessageFilter, after: tuple[datetime, uuid.UUID] | None
) -> list[ColumnElement[bool]]:
    m = messages.c
    conditions: list[ColumnElement[bool]] = [m.tenant_id == tenant_id]
    if wanted.statuses:
        conditions.append(m.status.in_([s.value for s in wanted.statuses]))
    if wanted.category is not None:
        conditions.append(m.category == wanted.category.value)
    if wanted.delivered_channel is not None:
        conditions.append(m.delivered_channel == wanted.delivered_channel.value)
    if wanted.created_after is not None:
        conditions.append(m.created_at >= wanted.created_after)
    if wanted.created_before is not None:
        conditions.append(m.created_at < wanted.created_before)
    doc = _search_doc(wanted)
    if doc:
        # Not in the ledger's Table: a generated column only searches read.
        search_doc = literal_column("messages.search_doc", JSONB)
        conditions.append(search_doc.op("@>")(literal(doc, JSONB)))
    if wanted.to is not None and wanted.to_channel is not None:
        # Rechecked on the rows the search index found.
        address = normalised_address(wanted.to)
        conditions.append(recipient_has(wanted.to_channel, address))
    if after is not None:
        conditions.append(tuple_(m.created_at, m.id) < tuple_(*after))
    return conditions


def search_query(
    tenant_id: uuid.UUID,
    wanted: MessageFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    *,
    few: bool = False,
) -> Any:
    """The page's rows, each with its last error.

    `few`: gather at most FEW_MATCHES + 1 matches first and sort those (a `matches` column
    tells how many were found); run it with bitmap scans only, so they come from the GIN
    index. Otherwise the rows come newest first from the tenant's ordered index.
    """
    m = messages.c
    columns = (
        m.id,
        m.category,
        m.status,
        m.delivered_channel,
        m.delivered_step,
        m.current_step,
        m.recipient,
        m.metadata,
        m.created_at,
        m.updated_at,
        m.completed_at,
    )
    conditions = _conditions(tenant_id, wanted, after)
    if few:
        hits = select(*columns).where(*conditions).limit(FEW_MATCHES + 1).cte("hits")
        matches = select(func.count()).select_from(hits).scalar_subquery().label("matches")
        page = (
            select(hits, matches)
            .order_by(hits.c.created_at.desc(), hits.c.id.desc())
            .limit(limit + 1)
            .subquery("page")
        )
    else:
        page = (
            select(*columns)
            .where(*conditions)
            .order_by(m.created_at.desc(), m.id.desc())
            .limit(limit + 1)
            .subquery("page")
        )
    # The page first, then each row's last error: the lookup runs once per row shown.
    last_error = (
        select(
            attempts.c.step,
            attempts.c.channel,
            attempts.c.error_code,
            attempts.c.error_detail,
        )
        .where(
            attempts.c.message_id == page.c.id,
            attempts.c.status.in_([s.value for s in UNSUCCESSFUL_ATTEMPT]),
        )
        .order_by(attempts.c.step.desc())
        .limit(1)
        .lateral("last_error")
    )
    return (
        select(
            page,
            last_error.c.step.label("error_step"),
            last_error.c.channel.label("error_channel"),
            last_error.c.error_code,
            last_error.c.error_detail,
        )
        .select_from(page.outerjoin(last_error, true()))
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


async def bitmap_scans_only(conn: AsyncConnection, only: bool) -> None:
    value = "off" if only else "on"
    await conn.execute(
        text(
            "SELECT set_config('enable_seqscan', :v, true), set_config('enable_indexscan', :v,"
            " true), set_config('enable_indexonlyscan', :v, true),"
            # A few thousand rows: parallel workers cost more to start than they save.
            " set_config('max_parallel_workers_per_gather', '0', true)"
        ),
        {"v": value},
    )


async def search_rows(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    wanted: MessageFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Any]:
    """Steer the plan for address / metadata / provider filters (the GIN search index).

    The planner has no statistics for a rare value (a recipient, an order id), guesses a
    fixed share of rows, and walks the tenant's newest-first index hoping to meet a page of
    them soon: at 10 M rows it meets them after reading everything. So first gather the
    matches from the GIN index, bitmap scans only, capped; when there are few, sort them
    and done. Many matches are met soon on the ordered walk: take that plan instead.
    """
    if wanted.to is not None or wanted.provider is not None or wanted.metadata:
        await bitmap_scans_only(conn, True)
        rows = list(await conn.execute(search_query(tenant_id, wanted, limit, after, few=True)))
        if not rows or rows[0].matches <= FEW_MATCHES:
            return rows
        await bitmap_scans_only(conn, False)
    return list(await conn.execute(search_query(tenant_id, wanted, limit, after)))


async def list_messages(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    wanted: MessageFilter,
    limit: int,
    cursor: str | None,
) -> MessagePage:
    """One page; call it inside a transaction (it may steer the planner with SET LOCAL)."""
    after = decode_cursor(cursor, "msg", (datetime, uuid.UUID)) if cursor else None
    rows = await search_rows(conn, tenant_id, wanted, limit, after)
    page = rows[:limit]
    next_cursor = (
        encode_cursor("msg", page[-1].created_at, page[-1].id)
        if len(rows) > limit and page
        else None
    )
    return MessagePage(
        data=[summary(row) for row in page],
        next_cursor=next_cursor,
    )


def summary(row: Any) -> MessageSummary:
    """A `search_rows` row as the API shows it."""
    return MessageSummary(
        id=to_public(IdPrefix.MESSAGE, row.id),
        category=row.category,
        status=row.status,
        delivered_channel=row.delivered_channel,
        delivered_step=row.delivered_step,
        current_step=row.current_step,
        to=row.recipient,
        metadata=row.metadata,
        created_at=row.created_at,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
        last_error=(
            LastErrorView(
                step=row.error_step,
                channel=row.error_channel,
                code=row.error_code,
                detail=row.error_detail,
            )
            if row.error_code is not None
            else None
        ),
    )
