"""Drives the state machine: load and lock, decide, persist, request the next jobs.

Two transactions wrap every provider call: `begin_send` marks the attempt `sending`
(committed before the request leaves, so a rerun never sends the same attempt twice)
and `record_send_result` applies what the provider answered.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import and_, exists, select

from app.auth.service import receipt_token
from app.cascade.machine import (
    FINAL_MESSAGE,
    OPEN_ATTEMPT,
    AttemptStatus,
    MessageStatus,
    Signal,
    StepView,
    SuccessOn,
    decide,
    retry_delay,
)
from app.db import Transaction
from app.ids import from_public, new_id, to_public
from app.ledger import repository as ledger
from app.ledger.repository import AttemptRow, MessageRow, NewEvent
from app.ledger.tables import attempts, messages
from app.queue import send_step_job, step_deadline_job
from app.settings import Settings
from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    OutboundMessage,
    Provider,
    ReceiptStatus,
    Recipient,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)
from providers.registry import ProviderRegistry, UnknownProvider

log = structlog.get_logger()

RECEIPT_SIGNALS = {
    ReceiptStatus.SENT: Signal.SENT,
    ReceiptStatus.DELIVERED: Signal.DELIVERED,
    ReceiptStatus.READ: Signal.READ,
    ReceiptStatus.FAILED: Signal.FAILED,
}
# A deferred job may fire a hair early; within this it counts as on time.
DEADLINE_SLACK = timedelta(milliseconds=100)


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SendPlan:
    message_id: uuid.UUID
    step: int
    provider: Provider
    outbound: OutboundMessage


def step_spec(message: MessageRow, step: int) -> dict[str, Any]:
    return message.cascade[step]


async def apply_signal(
    tx: Transaction,
    message: MessageRow,
    attempt: AttemptRow,
    signal: Signal,
    *,
    source: str,
    at: datetime,
    error: Error | None = None,
    dedupe_key: str | None = None,
    attempt_values: dict[str, Any] | None = None,
) -> bool:
    """Apply one signal about one attempt; returns whether anything changed."""
    view = StepView(
        message_status=message.status,
        current_step=message.current_step,
        step_count=len(message.cascade),
        step=attempt.step,
        attempt_status=attempt.status,
        success_on=SuccessOn(step_spec(message, attempt.step)["success_on"]),
    )
    decision = decide(view, signal)
    values = dict(attempt_values or {})
    if not decision.changes(view):
        if values:
            await ledger.update_attempt(tx.conn, attempt, at, **values)
        return False

    new_events: list[NewEvent] = []
    if decision.attempt_status != attempt.status:
        values["status"] = decision.attempt_status.value
        if decision.attempt_status not in OPEN_ATTEMPT:
            values["completed_at"] = at
        if error is not None:
            values["error_code"], values["error_detail"] = error.code, error.detail[:500]
        new_events.append(
            NewEvent(
                status=decision.attempt_status.value,
                source=source,
                attempt_id=attempt.id,
                step=attempt.step,
                detail={"code": error.code, "detail": error.detail[:500]} if error else None,
                dedupe_key=dedupe_key,
            )
        )
    if values:
        await ledger.update_attempt(tx.conn, attempt, at, **values)

    message_values: dict[str, Any] = {}
    if decision.delivered_step is not None:
        message_values["delivered_step"] = decision.delivered_step
        message_values["delivered_channel"] = step_spec(message, decision.delivered_step)["channel"]
    if decision.next_step is not None:
        message_values["current_step"] = decision.next_step
        tx.enqueue_after_commit(
            send_step_job(
                to_public("msg", message.id), Category(message.category), decision.next_step
            )
        )
    if decision.message_status != message.status:
        message_values["status"] = decision.message_status.value
        if decision.message_status in FINAL_MESSAGE:
            message_values["completed_at"] = at
            new_events.append(NewEvent(status=decision.message_status.value, source=source))
    added = await ledger.append_events(tx.conn, message, new_events, at)
    await ledger.update_message(tx.conn, message, at, seq=message.seq + added, **message_values)
    return True


def _outbound(
    message: MessageRow,
    attempt_id: uuid.UUID,
    step: int,
    address: str,
    tries: int,
    settings: Settings,
    provider: Provider,
) -> OutboundMessage:
    spec = step_spec(message, step)
    public_attempt = to_public("att", attempt_id)
    return OutboundMessage(
        message_id=to_public("msg", message.id),
        attempt_id=public_attempt,
        category=Category(message.category),
        channel=Channel(spec["channel"]),
        address=address,
        content=Content(**message.content),
        timeout_seconds=int(spec["timeout"]),
        try_number=tries,
        status_callback_url=(
            f"{settings.callback_base}/v1/providers/{provider.name}/status?attempt={public_attempt}"
        ),
        receipt_token=(
            receipt_token(settings.api_key_pepper.get_secret_value(), to_public("msg", message.id))
            if spec["channel"] == Channel.PUSH
            else None
        ),
        metadata={k: str(v) for k, v in message.metadata.items()},
        web_push=Recipient.from_mapping(message.recipient).web_push,
    )


async def begin_send(
    tx: Transaction,
    registry: ProviderRegistry,
    settings: Settings,
    message_id: uuid.UUID,
    step: int,
    at: datetime,
) -> SendPlan | None:
    """Claim step `step` for sending, or None when there is nothing (more) to send."""
    message = await ledger.lock_message(tx.conn, message_id)
    if message is None or message.status in FINAL_MESSAGE or message.current_step != step:
        return None
    spec = step_spec(message, step)
    channel = Channel(spec["channel"])
    attempt = await ledger.get_attempt(tx.conn, message_id, step)
    try:
        provider = registry.get(channel, spec["provider"], Category(message.category))
    except UnknownProvider as exc:
        provider = None
        config_error = Error("provider_unavailable", str(exc))
    if attempt is None:
        attempt = await ledger.insert_attempt(
            tx.conn,
            {
                "id": new_id(),
                "message_id": message.id,
                "category": message.category,
                "step": step,
                "channel": channel.value,
                "provider": spec["provider"],
                "status": AttemptStatus.PENDING.value,
                "tries": 0,
                "created_at": at,
                "updated_at": at,
                "deadline_at": at + timedelta(seconds=int(spec["timeout"])),
            },
        )
        tx.enqueue_after_commit(
            step_deadline_job(
                to_public("msg", message.id),
                Category(message.category),
                step,
                timedelta(seconds=int(spec["timeout"])),
            )
        )
    elif attempt.status is not AttemptStatus.PENDING:
        # Already handed to the provider (or finished): sending again could duplicate it.
        return None

    address = provider.address(Recipient.from_mapping(message.recipient)) if provider else None
    if provider is None or address is None:
        error = config_error if provider is None else Error("no_address", f"no {channel} address")
        await apply_signal(
            tx, message, attempt, Signal.REJECTED, source="worker", at=at, error=error
        )
        return None

    await ledger.update_attempt(
        tx.conn, attempt, at, status=AttemptStatus.SENDING.value, tries=attempt.tries + 1
    )
    new_events = (
        []
        if attempt.tries
        else [
            NewEvent(
                status=AttemptStatus.SENDING.value,
                source="worker",
                attempt_id=attempt.id,
                step=step,
            )
        ]
    )
    added = await ledger.append_events(tx.conn, message, new_events, at)
    await ledger.update_message(
        tx.conn, message, at, status=MessageStatus.SENDING.value, seq=message.seq + added
    )
    return SendPlan(
        message.id,
        step,
        provider,
        _outbound(message, attempt.id, step, address, attempt.tries, settings, provider),
    )


async def record_send_result(
    tx: Transaction,
    settings: Settings,
    plan: SendPlan,
    result: SendResult | TransientProviderError,
    at: datetime,
) -> None:
    message_id, step_index = plan.message_id, plan.step
    message = await ledger.lock_message(tx.conn, message_id)
    attempt = await ledger.get_attempt(tx.conn, message_id, step_index)
    if message is None or attempt is None:
        return
    if isinstance(result, Accepted):
        await apply_signal(
            tx,
            message,
            attempt,
            Signal.ACCEPTED,
            source="worker",
            at=at,
            attempt_values={"provider_message_id": result.provider_message_id, "sent_at": at},
        )
        return
    if not isinstance(result, TransientProviderError):
        await apply_signal(
            tx,
            message,
            attempt,
            Signal.REJECTED,
            source="worker",
            at=at,
            error=Error(result.code, result.detail),
        )
        return
    error = Error(result.code, result.detail)
    delay = retry_delay(
        attempt.tries,
        result.retry_after,
        settings.retry_base_delay,
        settings.retry_max_delay,
        random.random(),
    )
    retry_at = at + timedelta(seconds=delay)
    if attempt.status is not AttemptStatus.SENDING or message.status in FINAL_MESSAGE:
        return
    if retry_at >= attempt.deadline_at:
        await apply_signal(
            tx, message, attempt, Signal.RETRIES_EXHAUSTED, source="worker", at=at, error=error
        )
        return
    await ledger.update_attempt(
        tx.conn,
        attempt,
        at,
        status=AttemptStatus.PENDING.value,
        error_code=error.code,
        error_detail=error.detail[:500],
    )
    tx.enqueue_after_commit(
        send_step_job(
            plan.outbound.message_id,
            Category(message.category),
            step_index,
            try_number=attempt.tries,
            defer=timedelta(seconds=delay),
        )
    )


async def expire_step(tx: Transaction, message_id: uuid.UUID, step: int, at: datetime) -> None:
    message = await ledger.lock_message(tx.conn, message_id)
    if message is None or message.status in FINAL_MESSAGE:
        return
    attempt = await ledger.get_attempt(tx.conn, message_id, step)
    if attempt is None or attempt.deadline_at > at + DEADLINE_SLACK:
        return
    await apply_signal(
        tx,
        message,
        attempt,
        Signal.TIMEOUT,
        source="timeout",
        at=at,
        error=Error("timeout", "no success receipt before the step's timeout"),
    )


async def record_status(
    tx: Transaction, provider_name: str, update: StatusUpdate, at: datetime
) -> bool:
    """Apply one provider status report; the same report twice changes nothing."""
    attempt_id = from_public("att", update.attempt_id) if update.attempt_id else None
    attempt = await ledger.find_attempt(
        tx.conn,
        provider_name,
        attempt_id=attempt_id,
        provider_message_id=update.provider_message_id,
    )
    if attempt is None:
        log.info(
            "status_for_unknown_attempt",
            provider=provider_name,
            provider_message_id=update.provider_message_id,
        )
        return False
    message = await ledger.lock_message(tx.conn, attempt.message_id)
    dedupe_key = f"{provider_name}:{update.event_id}"
    if message is None or await ledger.event_seen(tx.conn, dedupe_key):
        return False
    # Re-read under the message lock: the attempt may have moved since the lookup.
    current = await ledger.get_attempt(tx.conn, attempt.message_id, attempt.step)
    assert current is not None
    error = (
        Error(update.error_code or "failed", update.error_detail or "")
        if (update.status is ReceiptStatus.FAILED)
        else None
    )
    values: dict[str, Any] = {}
    if update.provider_message_id and current.provider_message_id is None:
        values["provider_message_id"] = update.provider_message_id
    return await apply_signal(
        tx,
        message,
        current,
        RECEIPT_SIGNALS[update.status],
        source="provider",
        at=at,
        error=error,
        dedupe_key=dedupe_key,
        attempt_values=values,
    )


@dataclass(frozen=True, slots=True)
class SweepResult:
    steps: int
    deadlines: int


async def sweep(tx: Transaction, at: datetime, grace: timedelta, limit: int = 1000) -> SweepResult:
    """Re-enqueue work a crash or a lost Redis left behind; deterministic job ids dedupe."""
    cutoff = at - grace
    open_attempt = exists().where(
        and_(
            attempts.c.message_id == messages.c.id,
            attempts.c.step == messages.c.current_step,
            attempts.c.status.in_([AttemptStatus.SENDING.value, AttemptStatus.SENT.value]),
        )
    )
    stuck = await tx.conn.execute(
        select(messages.c.id, messages.c.category, messages.c.current_step)
        .where(
            messages.c.status.in_(["accepted", "queued", "sending"]),
            messages.c.updated_at < cutoff,
            ~open_attempt,
        )
        .limit(limit)
    )
    steps = 0
    for message_id, category, step in stuck:
        tx.enqueue_after_commit(
            send_step_job(to_public("msg", message_id), Category(category), step)
        )
        steps += 1
    overdue = await tx.conn.execute(
        select(attempts.c.message_id, attempts.c.category, attempts.c.step)
        .where(
            attempts.c.status.in_([s.value for s in OPEN_ATTEMPT]),
            attempts.c.deadline_at < at - DEADLINE_SLACK,
        )
        .limit(limit)
    )
    deadlines = 0
    for message_id, category, step in overdue:
        tx.enqueue_after_commit(
            step_deadline_job(to_public("msg", message_id), Category(category), step, timedelta(0))
        )
        deadlines += 1
    return SweepResult(steps, deadlines)
