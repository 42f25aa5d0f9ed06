"""Batch send: up to 1000 messages sharing defaults, accepted in one transaction.

Each item is validated, rendered and resolved on its own, so one bad address costs one
item, not the batch; items with nothing of their own but `to` and metadata reuse the
first such item's row (see `_SharedRow`). The accepted ones go in with a binary COPY of
the messages and one of their `accepted` events, and their jobs reach Redis after the
commit in one script call. An `Idempotency-Key` covers the whole batch; items may carry
their own key, shared with `POST /v1/messages`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    Table,
    Text,
    Uuid,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app.cascade.machine import MessageStatus
from app.db import Transaction
from app.errors import Conflict, FieldError, InvalidRequest, Problem, ProblemError
from app.ids import IdPrefix, new_id, to_public
from app.ledger.tables import events, idempotency_keys, messages, metadata
from app.messages.schemas import (
    AcceptedMessage,
    BatchItemResult,
    BatchMessageIn,
    BatchResult,
    InvalidBatchItem,
    SendBatchRequest,
    SendMessageRequest,
)
from app.messages.service import prepare_message, request_fingerprint, wake_for
from app.settings import Settings
from app.templates.service import TemplateLookup
from app.webhooks.service import notify_after_commit, tenant_has_endpoints
from providers.base import Provider, Recipient
from providers.registry import ProviderRegistry

batch_idempotency_keys = Table(
    "batch_idempotency_keys",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("request_hash", LargeBinary, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True, slots=True)
class BatchAcceptance:
    status_code: int
    result: BatchResult
    replayed: bool


def body_fingerprint(raw: bytes) -> bytes:
    """The batch as JSON, whatever its whitespace or key order."""
    return hashlib.sha256(orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)).digest()


def merged_request(batch: SendBatchRequest, item: BatchMessageIn) -> dict[str, Any]:
    """One message's request: the batch's defaults, then what the item gives.

    Parts already validated (`to`, the steps) are passed on as models, which pydantic
    does not validate again: a batch parses each phone number once, not twice.
    """
    content = item.content or batch.content
    merged_content: Any = content
    if item.data or item.locale or content is None:
        fields = content.model_dump(exclude_none=True) if content else {}
        if item.data:
            fields["data"] = {**fields.get("data", {}), **item.data}
        if item.locale:
            fields["locale"] = item.locale
        merged_content = fields
    return {
        "category": batch.category,
        "to": item.to,
        "content": merged_content,
        "cascade": item.cascade or batch.cascade,
        "metadata": item.metadata if item.metadata is not None else batch.metadata,
        "send_at": item.send_at or batch.send_at,
        "expires_at": item.expires_at or batch.expires_at,
    }


def _problem(index: int, error: ProblemError) -> Problem:
    problem = error.problem()
    for field_error in problem.errors:
        field_error.path = _item_path(index, field_error.path)
    return problem


def _item_path(index: int, path: str) -> str:
    rest = path.removeprefix("body").lstrip(".")
    return f"body.messages[{index}]" + (f".{rest}" if rest else "")


def _invalid(index: int, errors: list[FieldError]) -> Problem:
    return _problem(index, InvalidRequest(detail=f"{len(errors)} field error(s)", errors=errors))


_JSON_COLUMNS = frozenset(c.name for c in messages.c if isinstance(c.type, JSON))
_EVENT_COLUMNS = ("message_id", "category", "tenant_id", "seq", "status", "source", "at")


def _json(value: Any) -> str:
    # As the engine's json_serializer (app/db.py): asyncpg's jsonb codec, as SQLAlchemy
    # sets it up, takes the JSON text.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


_BEGIN = select(literal(1))


async def _driver_connection(tx: Transaction) -> Any:
    """The asyncpg connection under `tx`, inside `tx`'s database transaction.

    SQLAlchemy begins lazily, at its first statement: until then the raw connection is
    outside any transaction and a COPY on it would commit on its own."""
    raw = await tx.conn.get_raw_connection()
    driver: Any = raw.driver_connection
    if not driver.is_in_transaction():
        await tx.conn.execute(_BEGIN)
    return driver


async def insert_accepted_messages(tx: Transaction, rows: list[dict[str, Any]]) -> None:
    """Many messages, then their `accepted` events: a binary COPY each, on the connection
    (and in the transaction) of `tx`, so they commit or roll back with the rest.

    Measured against the alternatives: a statement per row (executemany) cost Postgres
    twice the CPU; one `INSERT ... SELECT FROM unnest(...)` of arrays cost it as much as
    COPY but held each batch longer."""
    driver = await _driver_connection(tx)
    columns = tuple(rows[0])
    json_at = [index for index, name in enumerate(columns) if name in _JSON_COLUMNS]
    # Rows that follow the batch share their content and cascade: encoded once each.
    encoded: dict[int, str] = {}
    records = []
    for row in rows:
        values = [row[name] for name in columns]
        for index in json_at:
            value = values[index]
            json_text = encoded.get(id(value))
            if json_text is None:
                json_text = encoded[id(value)] = _json(value)
            values[index] = json_text
        records.append(values)
    await driver.copy_records_to_table(messages.name, records=records, columns=columns)
    accepted = MessageStatus.ACCEPTED.value
    await driver.copy_records_to_table(
        events.name,
        records=[
            (row["id"], row["category"], row["tenant_id"], 1, accepted, "api", row["created_at"])
            for row in rows
        ],
        columns=_EVENT_COLUMNS,
    )


async def _claim_batch_key(
    tx: Transaction, tenant_id: uuid.UUID, key: str, fingerprint: bytes, at: datetime
) -> BatchAcceptance | None:
    """Claim the batch's key; the stored outcome when a batch already used it."""
    claimed = await tx.conn.execute(
        pg_insert(batch_idempotency_keys)
        .values(
            tenant_id=tenant_id,
            key=key,
            request_hash=fingerprint,
            status_code=0,
            response={},
            created_at=at,
        )
        .on_conflict_do_nothing()
        .returning(batch_idempotency_keys.c.key)
    )
    if claimed.first() is not None:
        return None
    # A concurrent duplicate waits on the primary key, then reads the committed outcome.
    row = (
        await tx.conn.execute(
            select(batch_idempotency_keys).where(
                batch_idempotency_keys.c.tenant_id == tenant_id,
                batch_idempotency_keys.c.key == key,
            )
        )
    ).one()
    if row.request_hash != fingerprint:
        raise Conflict("this Idempotency-Key was used with a different batch")
    return BatchAcceptance(row.status_code, BatchResult.model_validate(row.response), True)


async def _claim_item_keys(
    tx: Transaction,
    tenant_id: uuid.UUID,
    keyed: list[tuple[int, str, bytes, dict[str, Any]]],
    at: datetime,
) -> dict[int, BatchItemResult]:
    """Per-item keys: results for items that replay an earlier message or conflict."""
    outcome: dict[int, BatchItemResult] = {}
    first_use: dict[str, int] = {}
    fresh: list[tuple[int, str, bytes, dict[str, Any]]] = []
    for index, key, fingerprint, row in keyed:
        if key in first_use:
            error = Conflict(f"idempotency_key {key!r} appears twice in this batch")
            outcome[index] = BatchItemResult(index=index, problem=error.problem())
        else:
            first_use[key] = index
            fresh.append((index, key, fingerprint, row))
    if not fresh:
        return outcome
    fresh.sort(key=lambda item: item[1])  # one lock order for concurrent batches
    claimed = set(
        (
            await tx.conn.execute(
                pg_insert(idempotency_keys)
                .values(
                    [
                        {
                            "tenant_id": tenant_id,
                            "key": key,
                            "request_hash": fingerprint,
                            "message_id": row["id"],
                            "response": _accepted(row).model_dump(mode="json"),
                            "created_at": at,
                        }
                        for _, key, fingerprint, row in fresh
                    ]
                )
                .on_conflict_do_nothing()
                .returning(idempotency_keys.c.key)
            )
        ).scalars()
    )
    taken = [item for item in fresh if item[1] not in claimed]
    if not taken:
        return outcome
    earlier = {
        row.key: row
        for row in await tx.conn.execute(
            select(
                idempotency_keys.c.key,
                idempotency_keys.c.request_hash,
                idempotency_keys.c.response,
            ).where(
                idempotency_keys.c.tenant_id == tenant_id,
                idempotency_keys.c.key.in_([key for _, key, _, _ in taken]),
            )
        )
    }
    for index, key, fingerprint, _ in taken:
        stored = earlier[key]
        if stored.request_hash != fingerprint:
            error = Conflict(f"idempotency_key {key!r} was used with a different message")
            outcome[index] = BatchItemResult(index=index, problem=error.problem())
        else:
            replay = AcceptedMessage.model_validate(stored.response)
            outcome[index] = BatchItemResult(index=index, id=replay.id, status=replay.status)
    return outcome


def _accepted(row: Mapping[str, Any]) -> AcceptedMessage:
    return AcceptedMessage(
        id=to_public(IdPrefix.MESSAGE, row["id"]),
        status=row["status"],
        category=row["category"],
        created_at=row["created_at"],
    )


def _follows_batch(item: BatchMessageIn) -> bool:
    """Nothing of its own but `to` and metadata: the batch's content, cascade and schedule."""
    return (
        item.content is None
        and not item.data
        and item.locale is None
        and item.cascade is None
        and item.send_at is None
        and item.expires_at is None
        and item.idempotency_key is None
    )


class _SharedRow:
    """The row of the first accepted item that follows the batch, reused for the others.

    `prepare_message` would give each of them the same content, cascade and schedule: they
    differ in `to` and metadata alone. What depends on `to` is whether every step has an
    address; an item lacking one takes the full path, for its exact errors. A 1000-message
    batch thus renders, resolves and validates its defaults once, not 1000 times.
    """

    def __init__(self, batch: SendBatchRequest, registry: ProviderRegistry) -> None:
        self._batch = batch
        self._registry = registry
        self._row: dict[str, Any] | None = None
        self._providers: list[Provider] = []

    def learn(self, row: dict[str, Any]) -> None:
        if self._row is not None:
            return
        # The lookups `resolve_cascade` just made for this row, so they cannot fail.
        self._providers = [
            self._registry.get(step.channel, step.provider, self._batch.category)
            for step in self._batch.cascade or ()
        ]
        self._row = row

    def row_for(self, item: BatchMessageIn) -> dict[str, Any] | None:
        if self._row is None:
            return None
        recipient = item.to.model_dump(exclude_none=True)
        to = Recipient.from_mapping(recipient)
        if any(provider.address(to) is None for provider in self._providers):
            return None
        return {
            **self._row,
            "id": new_id(),
            "recipient": recipient,
            "metadata": item.metadata if item.metadata is not None else self._batch.metadata,
        }


async def accept_batch(
    tx: Transaction,
    tenant_id: uuid.UUID,
    batch: SendBatchRequest,
    raw_body: bytes,
    idempotency_key: str | None,
    registry: ProviderRegistry,
    settings: Settings,
    at: datetime,
) -> BatchAcceptance:
    if idempotency_key is not None:
        fingerprint = body_fingerprint(raw_body)
        replay = await _claim_batch_key(tx, tenant_id, idempotency_key, fingerprint, at)
        if replay is not None:
            return replay

    lookup = TemplateLookup(tx.conn, tenant_id, settings)
    shared = _SharedRow(batch, registry)
    results: dict[int, BatchItemResult] = {}
    rows: dict[int, dict[str, Any]] = {}
    keyed: list[tuple[int, str, bytes, dict[str, Any]]] = []
    for index, item in enumerate(batch.messages):
        if isinstance(item, InvalidBatchItem):
            results[index] = BatchItemResult(index=index, problem=_invalid(index, item.errors))
            continue
        follows_batch = _follows_batch(item)
        row = shared.row_for(item) if follows_batch else None
        if row is None:
            try:
                request = SendMessageRequest.model_validate(merged_request(batch, item))
                row = await prepare_message(tenant_id, request, registry, settings, lookup, at)
            except ValidationError as exc:
                errors = [
                    FieldError(
                        path=".".join(str(part) for part in err["loc"]),
                        message=err["msg"],
                        type=err["type"],
                    )
                    for err in exc.errors()
                ]
                results[index] = BatchItemResult(index=index, problem=_invalid(index, errors))
                continue
            except ProblemError as exc:
                results[index] = BatchItemResult(index=index, problem=_problem(index, exc))
                continue
            if follows_batch:
                shared.learn(row)
            if item.idempotency_key is not None:
                keyed.append((index, item.idempotency_key, request_fingerprint(request), row))
        rows[index] = row

    for index, result in (await _claim_item_keys(tx, tenant_id, keyed, at)).items():
        results[index] = result
        rows.pop(index, None)

    notify = bool(rows) and await tenant_has_endpoints(tx, tenant_id)
    if rows:
        await insert_accepted_messages(tx, list(rows.values()))
    for index, row in rows.items():
        results[index] = BatchItemResult(
            index=index, id=to_public(IdPrefix.MESSAGE, row["id"]), status=row["status"]
        )
        wake_for(tx, row)
        if notify:
            await notify_after_commit(tx, tenant_id, row["id"], row["category"])

    ordered = [results[index] for index in range(len(batch.messages))]
    accepted = sum(1 for result in ordered if result.id is not None)
    if accepted == 0:
        raise InvalidRequest(
            detail="no message in the batch can be accepted",
            errors=[
                error
                for result in ordered
                if result.problem is not None
                for error in (
                    result.problem.errors
                    or [
                        FieldError(
                            path=f"body.messages[{result.index}]",
                            message=result.problem.detail or result.problem.title,
                            type=result.problem.type.rsplit("/", 1)[-1],
                        )
                    ]
                )
            ],
        )
    outcome = BatchResult(accepted=accepted, rejected=len(ordered) - accepted, results=ordered)
    status_code = 202 if outcome.rejected == 0 else 207
    if idempotency_key is not None:
        await tx.conn.execute(
            update(batch_idempotency_keys)
            .where(
                batch_idempotency_keys.c.tenant_id == tenant_id,
                batch_idempotency_keys.c.key == idempotency_key,
            )
            .values(
                status_code=status_code,
                response=outcome.model_dump(mode="json", exclude_none=True),
            )
        )
    return BatchAcceptance(status_code, outcome, replayed=False)
