"""Drives the state machine: decide, then write the change; the next work is `due_at`.

Every function takes a message its caller has locked (`SELECT … FOR UPDATE`) and writes
through `write`: at once (one statement), or, inside a delivery-engine batch, gathered
with the batch's other messages into one statement (`ledger.write_changes`).
A step is claimed `sending`, committed, before its request leaves (`begin_send`), so a
rerun never sends the same attempt twice; `record_send_result` applies the answer.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog

from app.cascade import machine
from app.cascade.machine import (
    FINAL_MESSAGE,
    OPEN_ATTEMPT,
    UNSUCCESSFUL_ATTEMPT,
    AttemptStatus,
    Decision,
    MessageStatus,
    Signal,
    StepView,
    Stop,
    SuccessOn,
    decide,
    retry_delay,
    stop_message,
)
from app.cascade.outbound import outbound_message
from app.db import Transaction
from app.ids import IdPrefix, from_public, new_id, to_public
from app.ledger import repository as ledger
from app.ledger.repository import AttemptRow, Change, MessageRow, NewEvent
from app.observability import bind_message
from app.ops.stats.service import (
    LEDGER,
    Rollup,
    TotalCost,
    cost_correction,
    final_status_rollup,
    observe_outcome,
)
from app.policy import service as policy
from app.queue import cancel_provider_send_job
from app.settings import Settings
from app.templates.rendering import channel_content
from app.templates.segments import sms_segments
from app.webhooks.service import notify_after_commit
from providers.base import (
    Accepted,
    Category,
    Channel,
    OutboundMessage,
    Provider,
    ReceiptStatus,
    Recipient,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)
from providers.pricing import Price
from providers.registry import ProviderRegistry, UnknownProvider

log = structlog.get_logger()

RECEIPT_SIGNALS = {
    ReceiptStatus.SENT: Signal.SENT,
    ReceiptStatus.DELIVERED: Signal.DELIVERED,
    ReceiptStatus.READ: Signal.READ,
    ReceiptStatus.FAILED: Signal.FAILED,
}
# The message event of a second step's delivery (webhook type `message.delivered_again`).
DELIVERED_AGAIN = "delivered_again"
# A timer may be looked at a hair early; within this it counts as on time.
DEADLINE_SLACK = timedelta(milliseconds=100)


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SendPlan:
    message_id: uuid.UUID
    category: str
    step: int
    attempt_id: uuid.UUID
    provider: Provider
    outbound: OutboundMessage
    price: Price | None = None  # the account's, to cost the send when it is accepted


def step_spec(message: MessageRow, step: int) -> dict[str, Any]:
    return message.cascade[step]


def awaits_window(message: MessageRow, attempt: AttemptRow) -> bool:
    """The attempt succeeded on acceptance and waits out its window for a failure report."""
    spec = step_spec(message, attempt.step)
    return machine.awaits_window(
        attempt.status, SuccessOn(spec["success_on"]), spec.get("receipts", True)
    )


def due(message: MessageRow, at: datetime) -> datetime:
    """When the engine must look at the message next: `at`, or its expiry if sooner."""
    return at if message.expires_at is None else min(at, message.expires_at)


async def write(tx: Transaction, change: Change) -> None:
    """Write one message's change now, or gather it into the engine's batch statement."""
    if tx.changes is not None:
        tx.changes.append(change)
    else:
        await ledger.write_changes(tx.conn, [change])


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
    reach: ledger.Reach | None = None,
    **values: Any,
) -> None:
    """Write the change (attempt, events, message and its `seq`, the stats rollup of a
    final status) and tell webhooks after commit. A final message leaves the engine's
    index (`due_at` NULL)."""
    if values.get("status") in FINAL_MESSAGE:
        values["due_at"] = None
    await write(
        tx,
        Change(
            message,
            at,
            new,
            values,
            attempt=attempt,
            attempt_values=attempt_values,
            new_attempt=new_attempt,
            rollup_rows=rollup.rows if rollup is not None else None,
            reach=reach,
        ),
    )
    if rollup is not None:
        tx.after_commit(rollup.committed)
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
    unsaved: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
) -> bool:
    """Apply one signal about one attempt; returns whether anything changed. `unsaved`:
    the attempt is new, and this is its row (inserted with the outcome)."""
    spec = step_spec(message, attempt.step)
    view = StepView(
        message_status=message.status,
        current_step=message.current_step,
        step_count=len(message.cascade),
        step=attempt.step,
        attempt_status=attempt.status,
        success_on=SuccessOn(spec["success_on"]),
        reached_before=reached_before,
        reports_failures=spec.get("receipts", True),
        delivered_step=message.delivered_step,
    )
    decision = decide(view, signal)
    if (
        signal is Signal.TIMEOUT
        and decision.attempt_status is AttemptStatus.EXPIRED
        and attempt.status in (AttemptStatus.SENDING, AttemptStatus.SENT)
    ):
        # Given up on: withdraw it at the provider if it can, so it never arrives late.
        _cancel_at_provider(tx, message, attempt)
    values = dict(attempt_values or {})
    repriced, total = _repriced(message, attempt, values)
    if not decision.changes(view):
        if values:
            correction = cost_correction(message, total)
            await write(
                tx,
                Change(
                    message,
                    at,
                    [],
                    repriced,
                    attempt=attempt,
                    attempt_values=values,
                    rollup_rows=correction.rows if correction is not None else None,
                ),
            )
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
                occurred_at=occurred_at,
            )
        )
    message_values: dict[str, Any] = dict(repriced)
    if decision.delivered_step is not None:
        message_values["delivered_step"] = decision.delivered_step
        message_values["delivered_channel"] = step_spec(message, decision.delivered_step)["channel"]
    if decision.next_step is not None:
        # The next step is due now: the engine takes it in its next batch.
        message_values["current_step"] = decision.next_step
        message_values["due_at"] = due(message, at)
        tx.wake_after_commit(message.category)
    if decision.duplicate_delivery:
        # The customer got it on two steps: the ledger says so, the message keeps the first.
        new_events.append(
            NewEvent(
                status=DELIVERED_AGAIN,
                source=source,
                detail={
                    "code": "duplicate_delivery",
                    "detail": f"also delivered on step {attempt.step} ({attempt.channel})",
                },
            )
        )
    if decision.message_status != message.status:
        message_values["status"] = decision.message_status.value
        if decision.message_status in FINAL_MESSAGE:
            message_values["completed_at"] = at
            new_events.append(NewEvent(status=decision.message_status.value, source=source))
    rollup = observe_outcome(message, attempt, decision, source=source, at=at, cost=total)
    if rollup is None:
        rollup = cost_correction(message, total)
    await record_events(
        tx,
        message,
        new_events,
        at,
        attempt=None if unsaved is not None else attempt,
        attempt_values=values,
        new_attempt=unsaved,
        rollup=rollup,
        reach=_reach(message, attempt, signal, decision, error, at),
        **message_values,
    )
    return True


def _repriced(
    message: MessageRow, attempt: AttemptRow, values: Mapping[str, Any]
) -> tuple[dict[str, Any], TotalCost]:
    """When `values` price the attempt (or accept it unpriced): the message values that
    keep its total, and the total its rollup takes (None: unknown; else the ledger's)."""
    if "cost" not in values:
        return {}, LEDGER
    new, old = values["cost"], attempt.cost
    if new is None:
        if old is not None or message.unpriced:
            return {}, LEDGER
        return {"unpriced": True}, None  # sent on an account with no price for it
    if new == old:
        return {}, LEDGER
    zero = Decimal(0)
    total: Decimal = (message.cost or zero) - (old or zero) + new
    return {"cost": total}, None if message.unpriced else total


# Rejections that are ours, not the provider's word on the address.
_OUR_REJECTIONS = frozenset({"circuit_open", "provider_unavailable", "no_address"})
_ADDRESS_FAILURES = frozenset({Signal.FAILED, Signal.TIMEOUT, Signal.REJECTED})


def _reach(
    message: MessageRow,
    attempt: AttemptRow,
    signal: Signal,
    decision: Decision,
    error: Error | None,
    at: datetime,
) -> ledger.Reach | None:
    """What this outcome says of the attempt's address, for `skip_unreachable`: a failure
    receipt, no success before the timeout or a provider's refusal count against it (not
    our own refusals, nor transient errors until the window closed); a delivery (or an
    accepted step whose window closed clean) resets it."""
    if attempt.address is None:
        return None
    succeeded = (
        decision.attempt_status in (AttemptStatus.DELIVERED, AttemptStatus.READ)
        and attempt.status not in (AttemptStatus.DELIVERED, AttemptStatus.READ)
    ) or (signal is Signal.TIMEOUT and decision.delivered_step == attempt.step)
    if succeeded:
        return ledger.Reach(message.tenant_id, attempt.channel, attempt.address, None)
    failed = (
        signal in _ADDRESS_FAILURES
        and attempt.status in OPEN_ATTEMPT
        and decision.attempt_status in UNSUCCESSFUL_ATTEMPT
        and (error is None or error.code not in _OUR_REJECTIONS)
    )
    if failed:
        return ledger.Reach(message.tenant_id, attempt.channel, attempt.address, at)
    return None


def _cancel_at_provider(tx: Transaction, message: MessageRow, attempt: AttemptRow) -> None:
    if attempt.provider_message_id:
        tx.enqueue_after_commit(
            cancel_provider_send_job(
                Category(message.category), attempt.provider, attempt.provider_message_id
            )
        )


class _Load:
    """Marks an argument the function reads from the ledger itself."""


LOAD = _Load()


async def stop_now(
    tx: Transaction,
    message: MessageRow,
    stop: Stop,
    *,
    source: str,
    at: datetime,
    code: str,
    detail: str = "",
    attempt: AttemptRow | _Load | None = LOAD,
    more: Mapping[str, Any] | None = None,
) -> bool:
    """Cancel, expire or suppress a locked message whatever step it is on; False when it
    had already ended. `attempt`: its current attempt, when the caller has it."""
    if isinstance(attempt, _Load):
        attempt = await ledger.get_attempt(tx.conn, message.id, message.current_step)
    decision = stop_message(message.status, attempt.status if attempt else None, stop)
    if decision is None:
        return False
    reason: dict[str, Any] = {"code": code, "detail": detail} if detail else {"code": code}
    reason.update(more or {})
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
    rollup = final_status_rollup(message, decision.message_status, message.current_step, at)
    await record_events(
        tx,
        message,
        new_events,
        at,
        attempt=attempt,
        attempt_values=attempt_values,
        rollup=rollup,
        status=decision.message_status.value,
        completed_at=at,
    )
    if attempt is not None and attempt.status in (AttemptStatus.SENDING, AttemptStatus.SENT):
        _cancel_at_provider(tx, message, attempt)
    return True


async def expire_message(
    tx: Transaction, message: MessageRow, attempt: AttemptRow | None, at: datetime
) -> bool:
    """The message's `expires_at` has come: it ends `expired` unless it already ended."""
    if message.expires_at is None or message.expires_at > at + DEADLINE_SLACK:
        return False
    return await stop_now(
        tx,
        message,
        Stop.EXPIRE,
        source="timeout",
        at=at,
        code="expired",
        detail="not delivered before expires_at",
        attempt=attempt,
    )


async def retime(tx: Transaction, message: MessageRow, at: datetime, when: datetime) -> None:
    """Nothing to do yet: the engine looks at the message again at `when`."""
    await write(tx, Change(message, at, [], {"due_at": due(message, when)}))


async def forget(tx: Transaction, message: MessageRow, at: datetime) -> None:
    """Already final: the message leaves the engine's index."""
    await write(tx, Change(message, at, [], {"due_at": None}))


async def _defer(
    tx: Transaction, message: MessageRow, step: int, until: datetime, reason: str, at: datetime
) -> None:
    """Hold the step until `until` (quiet hours): `queued`, due again then."""
    event = NewEvent(
        status=MessageStatus.QUEUED.value,
        source="worker",
        step=step,
        detail={"code": reason, "until": until.isoformat()},
    )
    await record_events(
        tx,
        message,
        [event],
        at,
        status=MessageStatus.QUEUED.value,
        not_before=until,
        due_at=due(message, until),
    )


def step_target(
    registry: ProviderRegistry, message: MessageRow
) -> tuple[Channel, Provider | None, str | None, Error | None]:
    """The current step's channel, provider (None, with the error, when no account serves
    it) and the recipient's address on it (None when the recipient has none)."""
    spec = step_spec(message, message.current_step)
    channel = Channel(spec["channel"])
    try:
        provider = registry.get(channel, spec["provider"], Category(message.category))
    except UnknownProvider as exc:
        return channel, None, None, Error("provider_unavailable", str(exc))
    return channel, provider, provider.address(Recipient.from_mapping(message.recipient)), None


def _stored_address(
    message: MessageRow, channel: Channel, address: str | None, known: policy.Prefetched | None
) -> str | None:
    """The attempt's address as `address_health` keys it: normalised where it can be."""
    if address is None:
        return None
    if known is not None:
        normalised = known.addresses.get((message.tenant_id, channel.value, address))
        if normalised is not None:
            return normalised
    try:
        return policy.normalise_address(channel, address)
    except ValueError:
        return address


async def _reorder(
    tx: Transaction, message: MessageRow, known: policy.Prefetched | None
) -> MessageRow:
    """Before its first step, a message sent with `reorder` tries the recipient's preferred
    channel first, where its cascade has one (the stored cascade is rewritten)."""
    prefs = await policy.preferences_for(tx.conn, message, known)
    cascade = policy.reordered(message.cascade, prefs, Category(message.category))
    if cascade is None:
        return message
    await ledger.set_cascade(tx.conn, message, cascade)
    return replace(message, cascade=cascade)


async def begin_send(
    tx: Transaction,
    registry: ProviderRegistry,
    settings: Settings,
    message: MessageRow,
    attempt: AttemptRow | None,
    reached_before: bool,
    at: datetime,
    known: policy.Prefetched | None = None,
) -> SendPlan | None:
    """Claim the current step of a locked, unfinished message for sending (`attempt`: its
    attempt, None before the first try; `reached_before`: an earlier step was handed to a
    provider; `known`: the batch's policy lookups), or None when that is not (or no
    longer) to be done."""
    step = message.current_step
    if attempt is not None and attempt.status is not AttemptStatus.PENDING:
        # Already handed to the provider (or finished): sending again could duplicate it.
        return None
    if step == 0 and attempt is None and step_spec(message, 0).get("reorder"):
        message = await _reorder(tx, message, known)
    spec = step_spec(message, step)
    channel, provider, address, config_error = step_target(registry, message)
    skipped: policy.SkipStep | policy.Unreachable | policy.OptedOut | None = None
    if attempt is None and address is not None:
        verdict = await policy.gate_step(
            tx,
            message,
            channel,
            address,
            first_send=not reached_before,
            settings=settings,
            at=at,
            known=known,
        )
        if isinstance(verdict, policy.Defer):
            await _defer(tx, message, step, verdict.until, verdict.reason, at)
            return None
        if isinstance(verdict, policy.SuppressMessage):
            original = verdict.duplicate_of
            await stop_now(
                tx,
                message,
                Stop.SUPPRESS,
                source="worker",
                at=at,
                code=verdict.reason,
                attempt=None,
                more={"duplicate_of": to_public(IdPrefix.MESSAGE, original)} if original else None,
            )
            return None
        if isinstance(verdict, policy.SkipStep | policy.Unreachable | policy.OptedOut):
            skipped = verdict
    deadline = at + timedelta(seconds=int(spec["timeout"]))
    if attempt is None:
        pending = {
            "id": new_id(),
            "message_id": message.id,
            "category": message.category,
            "step": step,
            "channel": channel.value,
            "provider": spec["provider"],
            "address": _stored_address(message, channel, address, known),
            "status": AttemptStatus.PENDING.value,
            "tries": 0,
            "created_at": at,
            "updated_at": at,
            "deadline_at": deadline,
        }
        if skipped is not None or provider is None or address is None:
            # Never sent: the attempt is inserted with its outcome.
            if isinstance(skipped, policy.Unreachable):
                signal, error = (
                    Signal.SKIPPED,
                    Error(
                        "recipient_unreachable",
                        f"the address failed its last {skipped.failures} attempts on"
                        f" {channel.value} since {skipped.since.isoformat()}",
                    ),
                )
            elif isinstance(skipped, policy.OptedOut):
                signal, error = (
                    Signal.SUPPRESSED,
                    Error(
                        "preference",
                        f"the recipient opted out of {channel.value} for {message.category}",
                    ),
                )
            elif skipped is not None:
                signal, error = (
                    Signal.SUPPRESSED,
                    Error("suppressed", f"the address is suppressed ({skipped.reason.value})"),
                )
            elif provider is None:
                assert config_error is not None
                signal, error = Signal.REJECTED, config_error
            else:
                signal, error = Signal.REJECTED, Error("no_address", f"no {channel} address")
            await apply_signal(
                tx,
                message,
                ledger.new_attempt_row(pending),
                signal,
                source="worker",
                at=at,
                error=error,
                reached_before=reached_before,
                unsaved=pending,
            )
            return None
        claimed = {**pending, "status": AttemptStatus.SENDING.value, "tries": 1}
        attempt_row = ledger.new_attempt_row(claimed)
        await record_events(
            tx,
            message,
            [
                NewEvent(
                    status=AttemptStatus.SENDING.value,
                    source="worker",
                    attempt_id=attempt_row.id,
                    step=step,
                )
            ],
            at,
            new_attempt=claimed,
            status=MessageStatus.SENDING.value,
            due_at=due(message, deadline),
            **_fallback_cost(registry, message),
        )
    else:
        if provider is None or address is None:
            error = config_error or Error("no_address", f"no {channel} address")
            await apply_signal(
                tx, message, attempt, Signal.REJECTED, source="worker", at=at, error=error
            )
            return None
        # A retry after a transient error: the same attempt, within its window.
        attempt_row = replace(attempt, status=AttemptStatus.SENDING, tries=attempt.tries + 1)
        await record_events(
            tx,
            message,
            [],
            at,
            attempt=attempt,
            attempt_values={"status": AttemptStatus.SENDING.value, "tries": attempt_row.tries},
            status=MessageStatus.SENDING.value,
            due_at=due(message, attempt.deadline_at),
        )
    assert provider is not None and address is not None
    bind_message(message.id, message.tenant_id, message.category, attempt_row.id)
    return SendPlan(
        message.id,
        message.category,
        step,
        attempt_row.id,
        provider,
        outbound_message(
            message, attempt_row.id, step, address, attempt_row.tries - 1, settings, provider
        ),
        registry.price(provider.name),
    )


def _sms_segments(channel: Channel, text: str | None) -> int | None:
    return sms_segments(text).segments if channel is Channel.SMS and text else None


def _fallback_cost(registry: ProviderRegistry, message: MessageRow) -> dict[str, Any]:
    """What sending the message on its cascade's last step would cost, priced once (at its
    first send) for the savings in its stats; nothing when unpriced."""
    if message.fallback_cost is not None:
        return {}
    spec = message.cascade[-1]
    channel = Channel(spec["channel"])
    try:
        route = registry.route(channel, spec["provider"], Category(message.category))
    except UnknownProvider:
        return {}
    price = route.account.price
    if price is None:
        return {}
    address = route.provider.address(Recipient.from_mapping(message.recipient))
    text = channel_content(message.content, channel).get("text")
    cost = price.estimate(channel, address, _sms_segments(channel, text))
    return {} if cost is None else {"fallback_cost": cost}


def send_cost(plan: SendPlan, accepted: Accepted) -> dict[str, Any]:
    """The accepted send's cost from its account's price (SMS: per segment, as the adapter
    counted them or the text needs), as attempt values; None when unpriced."""
    if plan.price is None:
        return {"cost": None}
    outbound = plan.outbound
    segments = accepted.segments or _sms_segments(outbound.channel, outbound.content.text)
    cost = plan.price.estimate(outbound.channel, outbound.address, segments)
    return {"cost": None} if cost is None else {"cost": cost, "currency": plan.price.currency}


async def record_send_result(
    tx: Transaction,
    settings: Settings,
    plan: SendPlan,
    result: SendResult | TransientProviderError,
    at: datetime,
    message: MessageRow | None,
    attempt: AttemptRow | None,
) -> None:
    """Apply what the provider answered to the (locked) message and its attempt."""
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
            attempt_values={
                "provider_message_id": result.provider_message_id,
                "sent_at": at,
                "segments": result.segments,
                # A receipt that came first may have priced it already.
                **(send_cost(plan, result) if attempt.cost is None else {}),
            },
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
    if result.maybe_sent:
        # The request went out and no answer came: the provider may have the message, and
        # sending it again could deliver it twice. It stays `sending` with the error on
        # record; its receipt (matched by the attempt id) or its deadline decides.
        log.warning("send_outcome_unknown", provider=attempt.provider, error=error.code)
        await write(
            tx,
            Change(
                message,
                at,
                [],
                {"due_at": due(message, attempt.deadline_at)},
                attempt=attempt,
                attempt_values={"error_code": error.code, "error_detail": error.detail[:500]},
            ),
        )
        return
    if retry_at >= attempt.deadline_at:
        await apply_signal(
            tx, message, attempt, Signal.RETRIES_EXHAUSTED, source="worker", at=at, error=error
        )
        return
    await write(
        tx,
        Change(
            message,
            at,
            [],
            {"due_at": due(message, retry_at)},
            attempt=attempt,
            attempt_values={
                "status": AttemptStatus.PENDING.value,
                "error_code": error.code,
                "error_detail": error.detail[:500],
            },
        ),
    )


async def expire_step(
    tx: Transaction, message: MessageRow, attempt: AttemptRow, at: datetime
) -> None:
    """The current step's window has closed without success: it falls over."""
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
    (applied,) = await record_statuses(tx, [(provider_name, update)], at)
    return applied


AttemptKey = tuple[str, uuid.UUID] | tuple[str, str]
# An account's price table by account name (`ProviderRegistry.price`).
PriceBook = Callable[[str], Price | None]


def _attempt_key(provider_name: str, update: StatusUpdate) -> tuple[bool, AttemptKey] | None:
    """How a report names its attempt: (True, (provider, our id)) or (False, (provider,
    the provider's message id)); None when it names none."""
    attempt_id = from_public(IdPrefix.ATTEMPT, update.attempt_id) if update.attempt_id else None
    if attempt_id is not None:
        return True, (provider_name, attempt_id)
    if update.provider_message_id is not None:
        return False, (provider_name, update.provider_message_id)
    return None


async def record_statuses(
    tx: Transaction,
    reports: Sequence[tuple[str, StatusUpdate]],
    at: datetime,
    rollup_shard: int | None = None,
    prices: PriceBook | None = None,
) -> list[bool]:
    """Apply many provider status reports (provider, report) in one transaction: whether
    each changed anything, in order. The attempts' messages are locked in one query and
    the changes written in one statement per round; a message with several reports gets
    one per round, in the order they came (a `sent` before its `delivered`). The same
    report twice changes nothing (deduplicated on `(provider, event id)`).
    `rollup_shard`: see `ledger.write_changes`. `prices`: the accounts' price tables, for
    the prices receipts report."""
    named = [_attempt_key(provider, update) for provider, update in reports]
    by_id = list({key for n in named if n is not None and n[0] for key in [n[1]]})
    by_provider_id = list({key for n in named if n is not None and not n[0] for key in [n[1]]})
    messages = {
        m.id: m
        for m in await ledger.lock_messages_of_attempts(
            tx.conn,
            by_id,  # type: ignore[arg-type]
            by_provider_id,  # type: ignore[arg-type]
        )
    }
    attempts = await ledger.attempts_of(tx.conn, list(messages))
    found: dict[tuple[bool, AttemptKey], uuid.UUID] = {}
    for a in attempts:
        found[(True, (a.provider, a.id))] = a.id
        if a.provider_message_id is not None:
            found.setdefault((False, (a.provider, a.provider_message_id)), a.id)
    current = {a.id: a for a in attempts}
    seen = await ledger.seen_dedupe_keys(
        tx.conn, [f"{provider}:{update.event_id}" for provider, update in reports]
    )
    applied = [False] * len(reports)
    waiting: list[tuple[int, uuid.UUID]] = []
    for index, key in enumerate(named):
        attempt_id = found.get(key) if key is not None else None
        if attempt_id is None:
            provider, update = reports[index]
            log.info(
                "status_for_unknown_attempt",
                provider=provider,
                provider_message_id=update.provider_message_id,
            )
            continue
        waiting.append((index, attempt_id))
    while waiting:
        this_round: list[tuple[int, uuid.UUID]] = []
        later: list[tuple[int, uuid.UUID]] = []
        taken: set[uuid.UUID] = set()
        for index, attempt_id in waiting:
            message_id = current[attempt_id].message_id
            (later if message_id in taken else this_round).append((index, attempt_id))
            taken.add(message_id)
        buffered, tx.changes = tx.changes, []
        try:
            for index, attempt_id in this_round:
                attempt = current[attempt_id]
                provider, update = reports[index]
                applied[index] = await _apply_report(
                    tx, messages[attempt.message_id], attempt, provider, update, seen, at, prices
                )
            await ledger.write_changes(tx.conn, tx.changes, rollup_shard)
        finally:
            tx.changes = buffered
        if later:
            # The next round reads what this one wrote (the locks are still ours).
            ids = list({current[attempt_id].message_id for _, attempt_id in later})
            messages.update((m.id, m) for m in await ledger.messages_by_id(tx.conn, ids))
            current.update((a.id, a) for a in await ledger.attempts_of(tx.conn, ids))
        waiting = later
    return applied


async def _apply_report(
    tx: Transaction,
    message: MessageRow,
    current: AttemptRow,
    provider_name: str,
    update: StatusUpdate,
    seen: set[str],
    at: datetime,
    prices: PriceBook | None = None,
) -> bool:
    dedupe_key = f"{provider_name}:{update.event_id}"
    if dedupe_key in seen:
        return False
    seen.add(dedupe_key)
    error = (
        Error(update.error_code or "failed", update.error_detail or "")
        if (update.status is ReceiptStatus.FAILED)
        else None
    )
    values: dict[str, Any] = {}
    if update.provider_message_id and current.provider_message_id is None:
        values["provider_message_id"] = update.provider_message_id
    if (
        prices is not None
        and update.price is not None
        and (price := prices(provider_name)) is not None
    ):
        # The provider's word on the price replaces our estimate (or comes before it).
        values["cost"] = price.reported(Channel(current.channel), update.price, current.cost)
        values["currency"] = price.currency
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
        occurred_at=update.occurred_at,
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
