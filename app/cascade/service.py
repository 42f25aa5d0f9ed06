"""Drives the state machine: load and lock, decide, persist, request the next jobs.

Two transactions wrap every provider call: `begin_send` marks the attempt `sending`
(committed before the request leaves, so a rerun never sends the same attempt twice)
and `record_send_result` applies what the provider answered.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import and_, exists, or_, select

from app.auth.service import receipt_token
from app.cascade.machine import (
    FINAL_MESSAGE,
    OPEN_ATTEMPT,
    AttemptStatus,
    MessageStatus,
    Signal,
    StepView,
    Stop,
    SuccessOn,
    decide,
    retry_delay,
    stop_message,
)
from app.db import Transaction
from app.ids import from_public, new_id, to_public
from app.ledger import repository as ledger
from app.ledger.repository import AttemptRow, MessageRow, NewEvent
from app.ledger.tables import attempts, messages
from app.observability import bind_message
from app.ops.stats.service import Rollup, final_status_rollup, observe_outcome
from app.policy import service as policy
from app.queue import (
    cancel_provider_send_job,
    expire_message_job,
    send_step_job,
    step_deadline_job,
    withdrawn,
)
from app.settings import Settings
from app.templates.rendering import channel_content
from app.webhooks.service import notify_after_commit
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


async def record_events(
    tx: Transaction,
    message: MessageRow,
    new: list[NewEvent],
    at: datetime,
    *,
    attempt: AttemptRow | None = None,
    attempt_values: dict[str, Any] | None = None,
    new_attempt: dict[str, Any] | None = None,
    rollup: Rollup | None = None,
    **values: Any,
) -> None:
    """Write the change (attempt, events, message and its `seq`, the stats rollup of a
    final status) in one statement, and tell webhooks after commit."""
    await ledger.write_transition(
        tx.conn,
        message,
        at,
        new,
        values,
        attempt=attempt,
        attempt_values=attempt_values,
        new_attempt=new_attempt,
        also=(rollup.statement, rollup.params) if rollup is not None else None,
    )
    if rollup is not None:
        rollup.counted()
    if new:
        await notify_after_commit(tx, message.tenant_id, message.id, message.category)


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
    reached_before: bool = True,
) -> bool:
    """Apply one signal about one attempt; returns whether anything changed."""
    view = StepView(
        message_status=message.status,
        current_step=message.current_step,
        step_count=len(message.cascade),
        step=attempt.step,
        attempt_status=attempt.status,
        success_on=SuccessOn(step_spec(message, attempt.step)["success_on"]),
        reached_before=reached_before,
    )
    decision = decide(view, signal)
    if (
        signal is Signal.TIMEOUT
        and decision.attempt_status is AttemptStatus.EXPIRED
        and attempt.status in (AttemptStatus.SENDING, AttemptStatus.SENT)
    ):
        # Given up on: withdraw it at the provider if it can, so it never arrives late.
        _cancel_at_provider(tx, message, attempt)
    if (
        signal is not Signal.TIMEOUT
        and attempt.status in OPEN_ATTEMPT
        and decision.attempt_status not in OPEN_ATTEMPT
    ):
        _withdraw_deadline(tx, message, attempt.step)
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
    rollup = observe_outcome(message, attempt, decision, source=source, at=at)
    await record_events(
        tx,
        message,
        new_events,
        at,
        attempt=attempt,
        attempt_values=values,
        rollup=rollup,
        **message_values,
    )
    return True


def _withdraw_deadline(tx: Transaction, message: MessageRow, step: int) -> None:
    """The step ended before its timeout: its deadline job has nothing left to check."""
    job = step_deadline_job(
        to_public("msg", message.id), Category(message.category), step, timedelta(0)
    )
    tx.enqueue_after_commit(withdrawn(job))


def _cancel_at_provider(tx: Transaction, message: MessageRow, attempt: AttemptRow) -> None:
    if attempt.provider_message_id:
        tx.enqueue_after_commit(
            cancel_provider_send_job(
                Category(message.category), attempt.provider, attempt.provider_message_id
            )
        )


async def stop_now(
    tx: Transaction,
    message: MessageRow,
    stop: Stop,
    *,
    source: str,
    at: datetime,
    code: str,
    detail: str = "",
) -> bool:
    """Cancel, expire or suppress a locked message whatever step it is on; False when it
    had already ended."""
    attempt = await ledger.get_attempt(tx.conn, message.id, message.current_step)
    decision = stop_message(message.status, attempt.status if attempt else None, stop)
    if decision is None:
        return False
    reason = {"code": code, "detail": detail} if detail else {"code": code}
    new_events: list[NewEvent] = []
    attempt_values: dict[str, Any] = {}
    if attempt is not None and decision.attempt_status not in (None, attempt.status):
        assert decision.attempt_status is not None
        attempt_values = {
            "status": decision.attempt_status.value,
            "completed_at": at,
            "error_code": code,
            "error_detail": detail[:500],
        }
        new_events.append(
            NewEvent(
                status=decision.attempt_status.value,
                source=source,
                attempt_id=attempt.id,
                step=attempt.step,
                detail=reason,
            )
        )
    new_events.append(NewEvent(status=decision.message_status.value, source=source, detail=reason))
    await record_events(
        tx,
        message,
        new_events,
        at,
        attempt=attempt,
        attempt_values=attempt_values,
        rollup=final_status_rollup(message, decision.message_status, message.current_step, at),
        status=decision.message_status.value,
        completed_at=at,
    )
    if attempt is not None and attempt.status in (AttemptStatus.SENDING, AttemptStatus.SENT):
        _cancel_at_provider(tx, message, attempt)
    if attempt is not None and attempt.status in OPEN_ATTEMPT:
        _withdraw_deadline(tx, message, attempt.step)
    return True


async def expire_message(tx: Transaction, message_id: uuid.UUID, at: datetime) -> bool:
    """The message's `expires_at` has come: it ends `expired` unless it already ended."""
    message = await ledger.lock_message(tx.conn, message_id)
    if message is None or message.expires_at is None or message.expires_at > at + DEADLINE_SLACK:
        return False
    return await stop_now(
        tx,
        message,
        Stop.EXPIRE,
        source="timeout",
        at=at,
        code="expired",
        detail="not delivered before expires_at",
    )


async def _defer(
    tx: Transaction, message: MessageRow, step: int, until: datetime, reason: str, at: datetime
) -> None:
    """Hold the step until `until` (quiet hours): `queued`, with a job deferred to then."""
    event = NewEvent(
        status=MessageStatus.QUEUED.value,
        source="worker",
        step=step,
        detail={"code": reason, "until": until.isoformat()},
    )
    await record_events(
        tx, message, [event], at, status=MessageStatus.QUEUED.value, not_before=until
    )
    tx.enqueue_after_commit(
        send_step_job(
            to_public("msg", message.id),
            Category(message.category),
            step,
            not_before=until,
            deferred_again=True,
        )
    )


async def _reached_before(tx: Transaction, message_id: uuid.UUID, step: int) -> bool:
    """Whether an earlier step of the message was handed to a provider (not suppressed)."""
    if step == 0:
        return False
    found = await tx.conn.execute(
        select(attempts.c.id)
        .where(
            attempts.c.message_id == message_id,
            attempts.c.step < step,
            attempts.c.status != AttemptStatus.SUPPRESSED.value,
        )
        .limit(1)
    )
    return found.first() is not None


def _content(message: MessageRow, channel: Channel) -> Content:
    stored = channel_content(message.content, channel)
    stored["template_params"] = tuple(stored.get("template_params", ()))
    return Content(**{k: v for k, v in stored.items() if k in Content.__dataclass_fields__})


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
        content=_content(message, Channel(spec["channel"])),
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
        headers=(
            policy.unsubscribe_headers(settings, message.tenant_id, address)
            if message.category == Category.MARKETING and spec["channel"] == Channel.EMAIL
            else {}
        ),
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
    if message.expires_at is not None and message.expires_at <= at:
        await stop_now(tx, message, Stop.EXPIRE, source="timeout", at=at, code="expired")
        return None
    if message.not_before is not None and message.not_before > at + DEADLINE_SLACK:
        # Early (a sweep, a rerun): the job deferred to `not_before` sends it on time.
        tx.enqueue_after_commit(
            send_step_job(
                to_public("msg", message.id),
                Category(message.category),
                step,
                not_before=message.not_before,
                deferred_again=True,
            )
        )
        return None
    spec = step_spec(message, step)
    channel = Channel(spec["channel"])
    attempt = await ledger.get_attempt(tx.conn, message_id, step)
    try:
        provider = registry.get(channel, spec["provider"], Category(message.category))
    except UnknownProvider as exc:
        provider = None
        config_error = Error("provider_unavailable", str(exc))
    address = provider.address(Recipient.from_mapping(message.recipient)) if provider else None
    skipped: policy.SkipStep | None = None
    reached_before = True
    if attempt is None and address is not None:
        reached_before = await _reached_before(tx, message.id, step)
        verdict = await policy.gate_step(
            tx, message, channel, address, first_send=not reached_before, settings=settings, at=at
        )
        if isinstance(verdict, policy.Defer):
            await _defer(tx, message, step, verdict.until, verdict.reason, at)
            return None
        if isinstance(verdict, policy.SuppressMessage):
            await stop_now(tx, message, Stop.SUPPRESS, source="worker", at=at, code=verdict.reason)
            return None
        if isinstance(verdict, policy.SkipStep):
            skipped = verdict
    new_attempt: dict[str, Any] | None = None
    if attempt is None:
        pending = {
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
        }
        if skipped is not None or provider is None or address is None:
            attempt = await ledger.insert_attempt(tx.conn, pending)
        else:
            # The usual case: the attempt is inserted already `sending`, in the statement
            # that records the claim (below).
            new_attempt = {**pending, "status": AttemptStatus.SENDING.value, "tries": 1}
            attempt = ledger.new_attempt_row(pending)
        if skipped is not None:
            await apply_signal(
                tx,
                message,
                attempt,
                Signal.SUPPRESSED,
                source="worker",
                at=at,
                error=Error("suppressed", f"the address is suppressed ({skipped.reason.value})"),
                reached_before=reached_before,
            )
            return None
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

    if provider is None or address is None:
        error = config_error if provider is None else Error("no_address", f"no {channel} address")
        await apply_signal(
            tx, message, attempt, Signal.REJECTED, source="worker", at=at, error=error
        )
        return None

    bind_message(message.id, message.tenant_id, message.category, attempt.id)
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
    await record_events(
        tx,
        message,
        new_events,
        at,
        attempt=None if new_attempt else attempt,
        attempt_values={"status": AttemptStatus.SENDING.value, "tries": attempt.tries + 1},
        new_attempt=new_attempt,
        status=MessageStatus.SENDING.value,
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
        if message.status in (MessageStatus.CANCELLED, MessageStatus.EXPIRED):
            # Stopped while the request was in flight: withdraw it now its id is known.
            _cancel_at_provider(
                tx, message, replace(attempt, provider_message_id=result.provider_message_id)
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
    message = await ledger.lock_message_of_attempt(
        tx.conn,
        provider_name,
        attempt_id=attempt_id,
        provider_message_id=update.provider_message_id,
    )
    if message is None:
        log.info(
            "status_for_unknown_attempt",
            provider=provider_name,
            provider_message_id=update.provider_message_id,
        )
        return False
    dedupe_key = f"{provider_name}:{update.event_id}"
    # Read under the message lock: the attempt may have moved while we waited for it.
    current, seen = await ledger.attempt_and_seen(
        tx.conn,
        provider_name,
        dedupe_key,
        attempt_id=attempt_id,
        provider_message_id=update.provider_message_id,
    )
    if seen or current is None:
        return False
    error = (
        Error(update.error_code or "failed", update.error_detail or "")
        if (update.status is ReceiptStatus.FAILED)
        else None
    )
    values: dict[str, Any] = {}
    if update.provider_message_id and current.provider_message_id is None:
        values["provider_message_id"] = update.provider_message_id
    applied = await apply_signal(
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
    if applied and is_hard_bounce(current.channel, update) and message.recipient.get("email"):
        # A permanent bounce stops email to this address for every category.
        await policy.suppress(
            tx,
            message.tenant_id,
            Channel.EMAIL,
            message.recipient["email"],
            "hard_bounce",
            source="bounce",
            at=at,
        )
    return applied


def is_hard_bounce(channel: str, update: StatusUpdate) -> bool:
    """An email failure with a permanent (5.x.x) enhanced status code."""
    code = update.error_code or ""
    return (
        channel == Channel.EMAIL
        and update.status is ReceiptStatus.FAILED
        and code.startswith("smtp:5")
    )


@dataclass(frozen=True, slots=True)
class SweepResult:
    steps: int
    deadlines: int
    expired: int = 0


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
            # Scheduled or held for quiet hours: not stuck before its time has come.
            or_(messages.c.not_before.is_(None), messages.c.not_before < cutoff),
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
    past_expiry = await tx.conn.execute(
        select(messages.c.id, messages.c.category, messages.c.expires_at)
        .where(
            messages.c.status.in_(["accepted", "queued", "sending"]),
            messages.c.expires_at < at - DEADLINE_SLACK,
        )
        .limit(limit)
    )
    expired = 0
    for message_id, category, expires_at in past_expiry:
        tx.enqueue_after_commit(
            expire_message_job(to_public("msg", message_id), Category(category), expires_at)
        )
        expired += 1
    return SweepResult(steps, deadlines, expired)
