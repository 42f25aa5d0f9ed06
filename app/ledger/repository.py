"""SQL for the ledger: messages, attempts and the append-only event timeline.

Every function takes the open connection first and never commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import (
    ARRAY,
    Text,
    Uuid,
    any_,
    bindparam,
    func,
    select,
    text,
    update,
)
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
    send_at: datetime | None = None
    expires_at: datetime | None = None
    not_before: datetime | None = None
    due_at: datetime | None = None
    cost: Decimal | None = None  # the sum of its attempts' known costs
    fallback_cost: Decimal | None = None  # what its cascade's last step would cost
    unpriced: bool = False  # an attempt was accepted on an account with no price for it


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
    address: str | None = None  # as normalised for suppressions and address health
    segments: int | None = None  # SMS: how many messages the text went as
    cost: Decimal | None = None  # None: the account has no price that applies
    currency: str | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    status: str
    source: str
    attempt_id: uuid.UUID | None = None
    step: int | None = None
    detail: dict[str, Any] | None = None
    dedupe_key: str | None = None
    # When the provider says it happened (a receipt's own timestamp), if it says.
    occurred_at: datetime | None = None


# Rows of `messages` / `attempts` (every column, in table order: the dataclasses' field
# order, checked below) become their dataclass by position: by name (a dict per row) was
# a tenth of a receipt's CPU.
_MESSAGE_FIELDS = tuple(f.name for f in fields(MessageRow))
_ATTEMPT_FIELDS = tuple(f.name for f in fields(AttemptRow))
assert tuple(c.name for c in messages.c) == _MESSAGE_FIELDS
assert tuple(c.name for c in attempts.c) == _ATTEMPT_FIELDS


def _message(row: Any) -> MessageRow:
    if tuple(row._fields) != _MESSAGE_FIELDS:
        data = dict(row._mapping)
        data["status"] = MessageStatus(data["status"])
        return MessageRow(**data)
    return MessageRow(row[0], row[1], row[2], MessageStatus(row[3]), *row[4:])


def _attempt(row: Any) -> AttemptRow:
    if tuple(row._fields) != _ATTEMPT_FIELDS:
        data = dict(row._mapping)
        data["status"] = AttemptStatus(data["status"])
        return AttemptRow(**data)
    values: tuple[Any, ...] = (*row[:6], AttemptStatus(row[6]), *row[7:])
    return AttemptRow(*values)


# The columns of a new message (`messages.service.prepare_message`), in statement order.
NEW_MESSAGE_COLUMNS = (
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
    "send_at",
    "expires_at",
    "not_before",
    "due_at",
)
_NEW_MESSAGE_JSON = frozenset({"recipient", "content", "cascade", "metadata"})


def _accept_statement() -> str:
    columns = ", ".join(f'"{c}"' for c in NEW_MESSAGE_COLUMNS)
    defs = ", ".join(
        f'"{c}" {"jsonb" if c in _NEW_MESSAGE_JSON else _sql_type(c)}' for c in NEW_MESSAGE_COLUMNS
    )
    # A keyed message is inserted only if its key is claimed by this statement (the
    # claims' RETURNING is visible to the rest of it); each message gets its `accepted`
    # event. A key a concurrent transaction holds makes the claim wait for its outcome.
    # The rows come as JSON (one parameter each), their JSON columns nested as they are.
    return (
        "WITH claimed AS (INSERT INTO idempotency_keys"
        " (tenant_id, key, request_hash, message_id, response, created_at)"
        " SELECT c.tenant_id, c.key, decode(c.request_hash, 'hex'), c.message_id, c.response,"
        " c.created_at FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (tenant_id uuid,"
        " key text, request_hash text, message_id uuid, response jsonb, created_at timestamptz))"
        " WITH ORDINALITY AS c(tenant_id, key, request_hash, message_id, response, created_at,"
        " ord) ORDER BY c.ord ON CONFLICT DO NOTHING RETURNING message_id),"
        f" created AS (INSERT INTO messages ({columns})"
        f" SELECT {columns} FROM jsonb_to_recordset($2::jsonb) AS m({defs})"
        " WHERE m.id <> ALL($3::uuid[]) OR m.id IN (SELECT message_id FROM claimed)"
        " RETURNING id, category, tenant_id, created_at),"
        " accepted AS (INSERT INTO events (message_id, category, tenant_id, seq, status,"
        " source, at) SELECT id, category, tenant_id, 1, 'accepted', 'api', created_at"
        " FROM created)"
        " SELECT message_id FROM claimed"
    )


@dataclass(frozen=True, slots=True)
class KeyClaim:
    """An idempotency key to claim for a new message, with what a replay answers."""

    tenant_id: uuid.UUID
    key: str
    request_hash: bytes
    message_id: uuid.UUID
    response: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoredKey:
    request_hash: bytes
    response: dict[str, Any]


async def insert_accepted_messages(
    conn: AsyncConnection, rows: list[dict[str, Any]], claims: list[KeyClaim]
) -> set[uuid.UUID]:
    """Claim `claims`, then insert every row (and its `accepted` event) that is not keyed
    or whose key was claimed here: one statement, one round trip, whatever the
    number. Keyed rows are those whose id is a claim's `message_id`. Returns the ids of
    the claimed keys' messages. Claims should come sorted (one lock order for all)."""
    keyed = [claim.message_id for claim in claims]
    args = (
        orjson.dumps(
            [
                {
                    "tenant_id": c.tenant_id,
                    "key": c.key,
                    "request_hash": c.request_hash.hex(),
                    "message_id": c.message_id,
                    "response": c.response,
                    "created_at": c.created_at,
                }
                for c in claims
            ],
            default=_json_default,
        ).decode(),
        orjson.dumps(rows, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode(),
        keyed,
    )
    result = await conn.exec_driver_sql(_ACCEPT, args)
    return {message_id for (message_id,) in result.fetchall()}


_STORED_KEYS = (
    "SELECT k.tenant_id, k.key, k.request_hash, k.response FROM idempotency_keys k"
    " JOIN unnest($1::uuid[], $2::text[]) AS w(tenant_id, key)"
    " ON k.tenant_id = w.tenant_id AND k.key = w.key"
)


async def stored_keys(
    conn: AsyncConnection, keys: list[tuple[uuid.UUID, str]]
) -> dict[tuple[uuid.UUID, str], StoredKey]:
    """The stored request hash and response of these (tenant, key) idempotency keys."""
    if not keys:
        return {}
    found = await conn.exec_driver_sql(
        _STORED_KEYS, ([tenant for tenant, _ in keys], [key for _, key in keys])
    )
    stored = {}
    rows: list[Any] = list(found.fetchall())
    for tenant_id, key, request_hash, response in rows:
        data = orjson.loads(response) if isinstance(response, str | bytes) else response
        stored[(tenant_id, key)] = StoredKey(bytes(request_hash), data)
    return stored


# The hot statements are built once (per column set, for updates) with bind parameters:
# a statement built per call cost more CPU to construct and cache-key than to execute.
_GET_MESSAGE = select(messages).where(messages.c.id == bindparam("message_id"))
_GET_TENANT_MESSAGE = _GET_MESSAGE.where(messages.c.tenant_id == bindparam("tenant_id"))
_LOCK_MESSAGE = _GET_MESSAGE.with_for_update()
_GET_ATTEMPT = select(attempts).where(
    attempts.c.message_id == bindparam("message_id"), attempts.c.step == bindparam("step")
)
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
    "occurred_at",
)


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


_CLAIM_DUE = (
    select(messages)
    .where(
        messages.c.category == bindparam("category"),
        messages.c.due_at <= bindparam("now"),
    )
    .order_by(messages.c.due_at)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_LOCK_MESSAGES = (
    select(messages)
    .where(
        messages.c.category == bindparam("category"),
        messages.c.id == any_(bindparam("ids", type_=ARRAY(Uuid))),
    )
    .order_by(messages.c.id)
    .with_for_update()
)
_ATTEMPTS_OF = select(attempts).where(
    attempts.c.message_id == any_(bindparam("ids", type_=ARRAY(Uuid)))
)
_NEXT_DUE = select(func.min(messages.c.due_at)).where(
    messages.c.category == bindparam("category"), messages.c.due_at.is_not(None)
)


async def claim_due(
    conn: AsyncConnection, category: str, now: datetime, limit: int
) -> tuple[list[MessageRow], list[AttemptRow]]:
    """Lock up to `limit` of the category's messages whose `due_at` has come, oldest first,
    skipping those another worker (or a callback) holds; and all their attempts."""
    rows = await conn.execute(_CLAIM_DUE, {"category": category, "now": now, "limit": limit})
    claimed = [_message(row) for row in rows]
    return claimed, await attempts_of(conn, [m.id for m in claimed])


_MESSAGES_BY_ID = select(messages).where(messages.c.id == any_(bindparam("ids", type_=ARRAY(Uuid))))


async def messages_by_id(conn: AsyncConnection, ids: list[uuid.UUID]) -> list[MessageRow]:
    rows = await conn.execute(_MESSAGES_BY_ID, {"ids": ids})
    return [_message(row) for row in rows]


async def lock_messages(
    conn: AsyncConnection, category: str, ids: list[uuid.UUID]
) -> list[MessageRow]:
    """Lock these messages (in id order: two lockers of overlapping sets never deadlock)."""
    rows = await conn.execute(_LOCK_MESSAGES, {"category": category, "ids": ids})
    return [_message(row) for row in rows]


async def attempts_of(conn: AsyncConnection, ids: list[uuid.UUID]) -> list[AttemptRow]:
    if not ids:
        return []
    return [_attempt(row) for row in await conn.execute(_ATTEMPTS_OF, {"ids": ids})]


async def next_due(conn: AsyncConnection, category: str) -> datetime | None:
    """The earliest `due_at` of the category (an index lookup)."""
    value: datetime | None = (await conn.execute(_NEXT_DUE, {"category": category})).scalar()
    return value


async def list_attempts(conn: AsyncConnection, message_id: uuid.UUID) -> list[AttemptRow]:
    rows = await conn.execute(
        select(attempts).where(attempts.c.message_id == message_id).order_by(attempts.c.step)
    )
    return [_attempt(row) for row in rows]


# Status reports name an attempt by our id or by the provider's message id, always with the
# provider: the messages of all the attempts of a batch of reports, locked in id order.
_LOCK_MESSAGES_OF_ATTEMPTS = (
    text(
        f"SELECT {', '.join(f'm.{c.name}' for c in messages.c)}"
        " FROM messages m WHERE (m.id, m.category) IN ("
        " SELECT a.message_id, a.category FROM attempts a"
        " JOIN unnest(CAST(:id_providers AS text[]), CAST(:ids AS uuid[])) AS w(provider, id)"
        " ON a.id = w.id AND a.provider = w.provider"
        " UNION SELECT a.message_id, a.category FROM attempts a"
        " JOIN unnest(CAST(:pm_providers AS text[]), CAST(:pm_ids AS text[])) AS w(provider, pm)"
        " ON a.provider = w.provider AND a.provider_message_id = w.pm)"
        " ORDER BY m.id FOR UPDATE OF m"
    )
    .bindparams(
        bindparam("id_providers", type_=ARRAY(Text)),
        bindparam("ids", type_=ARRAY(Uuid)),
        bindparam("pm_providers", type_=ARRAY(Text)),
        bindparam("pm_ids", type_=ARRAY(Text)),
    )
    .columns(*messages.c)
)
_SEEN_KEYS = select(events.c.dedupe_key).where(
    events.c.dedupe_key == any_(bindparam("keys", type_=ARRAY(Text)))
)


async def lock_messages_of_attempts(
    conn: AsyncConnection,
    by_id: list[tuple[str, uuid.UUID]],
    by_provider_id: list[tuple[str, str]],
) -> list[MessageRow]:
    """Lock the messages of the attempts named (provider, our attempt id) or (provider, the
    provider's message id), in id order (one query): unknown ones are left out."""
    if not by_id and not by_provider_id:
        return []
    rows = await conn.execute(
        _LOCK_MESSAGES_OF_ATTEMPTS,
        {
            "id_providers": [p for p, _ in by_id],
            "ids": [i for _, i in by_id],
            "pm_providers": [p for p, _ in by_provider_id],
            "pm_ids": [i for _, i in by_provider_id],
        },
    )
    return [_message(row) for row in rows]


async def seen_dedupe_keys(conn: AsyncConnection, keys: list[str]) -> set[str]:
    """Which of these event dedupe keys the ledger already has."""
    if not keys:
        return set()
    return {row[0] for row in await conn.execute(_SEEN_KEYS, {"keys": keys})}


# What a change may set on a message and on an attempt: the bulk statement writes every one
# of these columns from arrays (the new value, or the row's own), so it has one shape.
MESSAGE_STATE = (
    "status",
    "current_step",
    "delivered_step",
    "delivered_channel",
    "seq",
    "updated_at",
    "completed_at",
    "not_before",
    "due_at",
    "cost",
    "fallback_cost",
    "unpriced",
)
ATTEMPT_STATE = (
    "status",
    "provider_message_id",
    "error_code",
    "error_detail",
    "tries",
    "sent_at",
    "completed_at",
    "updated_at",
    "deadline_at",
    "segments",
    "cost",
    "currency",
)
ATTEMPT_COLUMNS = (
    "id",
    "message_id",
    "category",
    "step",
    "channel",
    "provider",
    "address",
    "created_at",
    *ATTEMPT_STATE,
)
ROLLUP_COLUMNS = (
    "tenant_id",
    "category",
    "channel",
    "status",
    "step",
    "shard",
    "messages",
    "latency_ms_sum",
    "latency_hist",
    "cost",
    "priced",
    "fallback_cost",
    "resolution",
    "bucket",
)
_SQL_TYPES = {
    "id": "uuid",
    "message_id": "uuid",
    "tenant_id": "uuid",
    "attempt_id": "uuid",
    "category": "text",
    "step": "int",
    "seq": "int",
    "tries": "int",
    "segments": "int",
    "current_step": "int",
    "delivered_step": "int",
    "shard": "int",
    "messages": "bigint",
    "latency_ms_sum": "bigint",
    "cost": "numeric",
    "fallback_cost": "numeric",
    "priced": "bigint",
    "unpriced": "boolean",
    "detail": "jsonb",
    "latency_hist_json": "jsonb",
    "not_before": "timestamptz",
    "at": "timestamptz",
    "bucket": "timestamptz",
}


def _sql_type(column: str) -> str:
    if column in _SQL_TYPES:
        return _SQL_TYPES[column]
    return "timestamptz" if column.endswith("_at") else "text"


@dataclass(slots=True)
class Change:
    """One message's state change, as data: what `write_changes` writes.

    `attempt` with `attempt_values` updates a stored attempt; `new_attempt` (a full row)
    inserts one; `events` are appended after the message's `seq`; `rollup_rows` are the
    stats rows of a message that just became final."""

    message: MessageRow
    at: datetime
    events: list[NewEvent]
    message_values: dict[str, Any]
    attempt: AttemptRow | None = None
    attempt_values: dict[str, Any] | None = None
    new_attempt: dict[str, Any] | None = None
    rollup_rows: list[dict[str, Any]] | None = None
    # What the attempt's outcome says of its address: failed at (a time), or reachable
    # (None); `address_health` keeps it.
    reach: Reach | None = None


@dataclass(frozen=True, slots=True)
class Reach:
    tenant_id: uuid.UUID
    channel: str
    address: str
    failed_at: datetime | None  # None: delivered, so reachable


# How many failure times `address_health` keeps per address (`after_failures` at most).
HEALTH_KEPT = 10
_HEALTH_KEY = ("tenant_id", "channel", "address")
_HEALTH_ROW = (*_HEALTH_KEY, "failed_at")


def _health_upsert(name: str, n: int, *, append: bool) -> str:
    """Failure times per address, from parameter `n` (a row per failure), added to the
    kept ones (`append`) or in their place (the address succeeded earlier in the batch)."""
    rows = _records(f"{name}_r", _HEALTH_ROW, n)
    kept = "address_health.failed_at || excluded.failed_at" if append else "excluded.failed_at"
    return (
        f"{name} AS (INSERT INTO address_health (tenant_id, channel, address, failed_at)"
        f" SELECT tenant_id, channel, address, array_agg(failed_at ORDER BY ord) FROM {rows}"
        " GROUP BY tenant_id, channel, address ORDER BY tenant_id, channel, address"
        " ON CONFLICT (tenant_id, channel, address) DO UPDATE SET failed_at ="
        f" ({kept})[greatest(1, cardinality({kept}) - {HEALTH_KEPT - 1}):])"
    )


def _records(alias: str, columns: tuple[str, ...], n: int) -> str:
    """Rows from parameter `n`, a JSON array of objects keyed by `columns`: one parameter
    per table, encoded in one `orjson.dumps` (arrays of every column cost the driver a
    Python-level check per element, a fifth of a receipt's CPU)."""
    defs = ", ".join(f"{c} {_sql_type(c)}" for c in columns)
    return (
        f"ROWS FROM (jsonb_to_recordset(${n}::jsonb) AS ({defs}))"
        f" WITH ORDINALITY AS {alias}({', '.join(columns)}, ord)"
    )


_HIST_SUM = (
    "(SELECT array_agg(a + b ORDER BY i) FROM unnest(stats_rollups.latency_hist,"
    " excluded.latency_hist) WITH ORDINALITY AS h(a, b, i))"
)


def _nullable_sum(column: str) -> str:
    """A rollup amount plus the new one: NULL (unpriced) stays NULL until one is known."""
    return (
        f"CASE WHEN excluded.{column} IS NULL THEN stats_rollups.{column}"
        f" ELSE coalesce(stats_rollups.{column}, 0) + excluded.{column} END"
    )


def _changes_statement() -> str:
    parts = []
    new_attempts = _records("n", ATTEMPT_COLUMNS, 1)
    parts.append(
        f"new_attempts AS (INSERT INTO attempts ({', '.join(ATTEMPT_COLUMNS)})"
        f" SELECT {', '.join(ATTEMPT_COLUMNS)} FROM {new_attempts} ORDER BY ord)"
    )
    changed = ("id", *ATTEMPT_STATE)
    changed_attempts = _records("u", changed, 2)
    sets = ", ".join(f"{c} = u.{c}" for c in ATTEMPT_STATE)
    parts.append(
        f"changed_attempts AS (UPDATE attempts SET {sets} FROM {changed_attempts}"
        " WHERE attempts.id = u.id)"
    )
    new_events = _records("e", _EVENT_COLUMNS, 3)
    parts.append(
        f"new_events AS (INSERT INTO events ({', '.join(_EVENT_COLUMNS)})"
        f" SELECT {', '.join(_EVENT_COLUMNS)} FROM {new_events} ORDER BY ord"
        " ON CONFLICT (dedupe_key) DO NOTHING)"
    )
    rollup_row = tuple(c if c != "latency_hist" else "latency_hist_json" for c in ROLLUP_COLUMNS)
    rollups = _records("r", rollup_row, 4)
    select_rollup = ", ".join(
        "ARRAY(SELECT h.x::int FROM jsonb_array_elements_text(latency_hist_json)"
        " WITH ORDINALITY AS h(x, i) ORDER BY h.i)"
        if c == "latency_hist_json"
        else c
        for c in rollup_row
    )
    parts.append(
        f"rollups AS (INSERT INTO stats_rollups ({', '.join(ROLLUP_COLUMNS)})"
        f" SELECT {select_rollup} FROM {rollups} ORDER BY ord"
        " ON CONFLICT (tenant_id, category, channel, status, step, shard, resolution, bucket)"
        " DO UPDATE SET messages = stats_rollups.messages + excluded.messages,"
        " latency_ms_sum = stats_rollups.latency_ms_sum + excluded.latency_ms_sum,"
        f" latency_hist = {_HIST_SUM},"
        f" cost = {_nullable_sum('cost')}, priced = stats_rollups.priced + excluded.priced,"
        f" fallback_cost = {_nullable_sum('fallback_cost')})"
    )
    parts.append(_health_upsert("health_failed", 6, append=True))
    parts.append(_health_upsert("health_reset", 7, append=False))
    cleared = _records("c", _HEALTH_KEY, 8)
    parts.append(
        f"health_cleared AS (DELETE FROM address_health h USING {cleared}"
        " WHERE h.tenant_id = c.tenant_id AND h.channel = c.channel AND h.address = c.address)"
    )
    moved = ("id", "category", *MESSAGE_STATE)
    messages_from = _records("m", moved, 5)
    sets = ", ".join(f"{c} = m.{c}" for c in MESSAGE_STATE)
    return (
        "WITH " + ", ".join(parts) + f" UPDATE messages SET {sets} FROM {messages_from}"
        " WHERE messages.id = m.id AND messages.category = m.category"
    )


_WRITE_CHANGES = _changes_statement()
_ACCEPT = _accept_statement()


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


async def write_changes(
    conn: AsyncConnection, changes: list[Change], rollup_shard: int | None = None
) -> None:
    """Write many messages' changes in one statement (one round trip): attempts inserted
    and updated, events appended, stats rolled up and messages moved, each from JSON rows,
    whatever the number of messages. `rollup_shard`: every stats row of this write on
    that shard (readers add the shards up), so concurrent writers that each keep to a
    shard of their own never wait for each other's rollup rows.

    Callers hold every message's lock, so sequence numbers are gap-free; each message
    appears at most once. An event whose `dedupe_key` exists is skipped (callers check
    first under the lock, so that is a safety net: `seq` still advances past it)."""
    if not changes:
        return
    new_attempts: list[tuple[Any, ...]] = []
    changed_attempts: list[tuple[Any, ...]] = []
    new_events: list[tuple[Any, ...]] = []
    rollups: dict[tuple[Any, ...], dict[str, Any]] = {}
    moved: list[tuple[Any, ...]] = []
    # Per address, in order: whether it succeeded in this batch, and the failures since.
    health: dict[tuple[Any, ...], tuple[bool, list[datetime]]] = {}
    for change in changes:
        message, at = change.message, change.at
        if change.reach is not None:
            reach = change.reach
            key = (reach.tenant_id, reach.channel, reach.address)
            if reach.failed_at is None:
                health[key] = (True, [])
            else:
                health.setdefault(key, (False, []))[1].append(reach.failed_at)
        if change.new_attempt is not None:
            row = {
                "address": None,
                "segments": None,
                "cost": None,
                "currency": None,
                "provider_message_id": None,
                "error_code": None,
                "error_detail": None,
                "sent_at": None,
                "completed_at": None,
                **change.new_attempt,
                **(change.attempt_values or {}),
                "updated_at": at,
            }
            new_attempts.append(tuple(row[c] for c in ATTEMPT_COLUMNS))
        elif change.attempt is not None and change.attempt_values:
            values = {**change.attempt_values, "updated_at": at}
            current = change.attempt
            changed_attempts.append(
                (
                    current.id,
                    *(values[c] if c in values else getattr(current, c) for c in ATTEMPT_STATE),
                )
            )
        for i, event in enumerate(change.events):
            new_events.append(
                (
                    message.id,
                    message.category,
                    message.tenant_id,
                    message.seq + i + 1,
                    event.attempt_id,
                    event.step,
                    event.status,
                    event.source,
                    event.detail,
                    event.dedupe_key,
                    at,
                    event.occurred_at,
                )
            )
        for rollup in change.rollup_rows or ():
            if rollup_shard is not None:
                rollup = {**rollup, "shard": rollup_shard}
            key = tuple(rollup[c] for c in ROLLUP_COLUMNS if c not in _ROLLUP_SUMS)
            if key in rollups:
                _add_rollup(rollups[key], rollup)
            else:
                rollups[key] = dict(rollup)
        if not change.events and not change.message_values:
            continue  # the attempt alone changed: the message row stays as it is
        values = {
            **change.message_values,
            "seq": message.seq + len(change.events),
            "updated_at": at,
        }
        moved.append(
            (
                message.id,
                message.category,
                *(values[c] if c in values else getattr(message, c) for c in MESSAGE_STATE),
            )
        )
    rollup_row = tuple(c if c != "latency_hist" else "latency_hist_json" for c in ROLLUP_COLUMNS)
    # In key order: concurrent writers (receipt flushes, engine batches) upsert the same
    # rollup rows, and in any other order they deadlocked (1 s until Postgres noticed).
    ordered = [rollups[key] for key in sorted(rollups, key=_rollup_order)]
    args = (
        _json_records(ATTEMPT_COLUMNS, new_attempts),
        _json_records(("id", *ATTEMPT_STATE), changed_attempts),
        _json_records(_EVENT_COLUMNS, new_events),
        _json_records(rollup_row, [tuple(r[c] for c in ROLLUP_COLUMNS) for r in ordered]),
        _json_records(("id", "category", *MESSAGE_STATE), moved),
        *_health_records(health),
    )
    await conn.exec_driver_sql(_WRITE_CHANGES, args)


def _health_records(health: dict[tuple[Any, ...], tuple[bool, list[datetime]]]) -> list[str]:
    """`address_health`'s three parameters (failures to add, failures in place of the kept
    ones, addresses to clear), in key order: concurrent writers lock rows in one order."""
    failed: list[tuple[Any, ...]] = []
    reset: list[tuple[Any, ...]] = []
    cleared: list[tuple[Any, ...]] = []
    for key in sorted(health, key=lambda k: (str(k[0]), k[1], k[2])):
        succeeded, failures = health[key]
        if not failures:
            cleared.append(key)
        for failed_at in failures:
            (reset if succeeded else failed).append((*key, failed_at))
    return [
        _json_records(_HEALTH_ROW, failed),
        _json_records(_HEALTH_ROW, reset),
        _json_records(_HEALTH_KEY, cleared),
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)  # Decimal exactly; asyncpg's own UUID type, which orjson skips
    raise TypeError(f"not JSON: {type(value).__name__}")


def _json_records(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    return orjson.dumps(
        [dict(zip(columns, row, strict=True)) for row in rows], default=_json_default
    ).decode()


def _rollup_order(key: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(part) for part in key)


_ROLLUP_SUMS = frozenset(
    {"messages", "latency_ms_sum", "latency_hist", "cost", "priced", "fallback_cost"}
)


def _add_rollup(into: dict[str, Any], more: dict[str, Any]) -> None:
    into["messages"] += more["messages"]
    into["latency_ms_sum"] += more["latency_ms_sum"]
    into["latency_hist"] = [
        a + b for a, b in zip(into["latency_hist"], more["latency_hist"], strict=True)
    ]
    into["priced"] += more["priced"]
    for amount in ("cost", "fallback_cost"):
        if more[amount] is not None:
            into[amount] = (into[amount] or 0) + more[amount]


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Row tuples as one list per column (the arrays `unnest` takes)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


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


async def list_events(conn: AsyncConnection, message_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.execute(
        select(events).where(events.c.message_id == message_id).order_by(events.c.seq)
    )
    return [dict(row._mapping) for row in rows]


async def set_cascade(
    conn: AsyncConnection, message: MessageRow, cascade: list[dict[str, Any]]
) -> None:
    """Rewrite a (locked) message's cascade: its steps in a new order, before the first."""
    await conn.execute(
        update(messages)
        .where(messages.c.id == message.id, messages.c.category == message.category)
        .values(cascade=cascade)
    )
