"""Batch send: up to 1000 messages sharing defaults, accepted in one transaction.

Each item is validated, rendered and resolved on its own, so one bad address costs one
item, not the batch. The accepted ones go in with one multi-row insert (messages and
their `accepted` events in one statement), and their jobs reach Redis after the commit
in one pipelined round trip. An `Idempotency-Key` covers the whole batch; items may
carry their own key, shared with `POST /v1/messages`.
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
    Column,
    DateTime,
    Integer,
    LargeBinary,
    Table,
    Text,
    Uuid,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.cascade.machine import MessageStatus
from app.db import Transaction
from app.errors import Conflict, FieldError, InvalidRequest, Problem, ProblemError
from app.ids import to_public
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
from app.messages.service import first_jobs, prepare_message, request_fingerprint
from app.settings import Settings
from app.templates.service import TemplateLookup
from app.webhooks.service import notify_after_commit
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


async def insert_accepted_messages(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Many messages, then their `accepted` events: two statements, each sent once with
    every row (asyncpg's executemany), not a statement per message."""
    await conn.execute(insert(messages), rows)
    await conn.execute(
        insert(events),
        [
            {
                "message_id": row["id"],
                "category": row["category"],
                "tenant_id": row["tenant_id"],
                "seq": 1,
                "status": MessageStatus.ACCEPTED.value,
                "source": "api",
                "at": row["created_at"],
            }
            for row in rows
        ],
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
        id=to_public("msg", row["id"]),
        status=row["status"],
        category=row["category"],
        created_at=row["created_at"],
    )


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
    fingerprint = body_fingerprint(raw_body)
    if idempotency_key is not None:
        replay = await _claim_batch_key(tx, tenant_id, idempotency_key, fingerprint, at)
        if replay is not None:
            return replay

    lookup = TemplateLookup(tx.conn, tenant_id, settings)
    results: dict[int, BatchItemResult] = {}
    rows: dict[int, dict[str, Any]] = {}
    keyed: list[tuple[int, str, bytes, dict[str, Any]]] = []
    for index, item in enumerate(batch.messages):
        if isinstance(item, InvalidBatchItem):
            results[index] = BatchItemResult(index=index, problem=_invalid(index, item.errors))
            continue
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
        rows[index] = row
        if item.idempotency_key is not None:
            keyed.append((index, item.idempotency_key, request_fingerprint(request), row))

    for index, result in (await _claim_item_keys(tx, tenant_id, keyed, at)).items():
        results[index] = result
        rows.pop(index, None)

    if rows:
        await insert_accepted_messages(tx.conn, list(rows.values()))
    for index, row in rows.items():
        results[index] = BatchItemResult(
            index=index, id=to_public("msg", row["id"]), status=row["status"]
        )
        for job in first_jobs(row):
            tx.enqueue_after_commit(job)
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
