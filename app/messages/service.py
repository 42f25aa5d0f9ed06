"""Accepting and looking up messages."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from app.cascade.machine import MessageStatus, Stop, SuccessOn
from app.cascade.service import stop_now
from app.db import Transaction
from app.errors import Conflict, FieldError, InvalidRequest, NotFound, ProblemError
from app.ids import IdPrefix, from_public, new_id, to_public
from app.ledger import repository as ledger
from app.ledger.repository import AttemptRow
from app.messages.schemas import (
    AcceptedMessage,
    AttemptView,
    CascadeStepView,
    ErrorView,
    EventView,
    MessageView,
    SendMessageRequest,
)
from app.settings import Settings
from app.templates.rendering import channel_content
from app.templates.service import TemplateLookup, render_template
from app.webhooks.service import notify_after_commit
from providers.base import Channel, Provider, Recipient
from providers.registry import ProviderRegistry, UnknownProvider

DEFAULT_SUCCESS_ON = {
    Channel.PUSH: SuccessOn.DELIVERED,
    Channel.MESSENGER: SuccessOn.DELIVERED,
    Channel.SMS: SuccessOn.DELIVERED,
    Channel.EMAIL: SuccessOn.ACCEPTED,
}


@dataclass(frozen=True, slots=True)
class Acceptance:
    message: AcceptedMessage
    replayed: bool


def resolve_cascade(
    request: SendMessageRequest,
    registry: ProviderRegistry,
    settings: Settings,
    content: Mapping[str, Any] | None = None,
    recipient: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Fill in providers, timeouts and success rules; every step must be sendable.

    `content` is what will be stored (a template's rendering per channel); by default the
    request's inline content.
    """
    to = Recipient.from_mapping(
        recipient if recipient is not None else request.to.model_dump(exclude_none=True)
    )
    stored = content if content is not None else inline_content(request)
    steps: list[dict[str, Any]] = []
    errors: list[FieldError] = []
    for index, step in enumerate(request.cascade):
        path = f"body.cascade[{index}]"
        try:
            provider = registry.get(step.channel, step.provider, request.category)
        except UnknownProvider as exc:
            errors.append(
                FieldError(path=f"{path}.provider", message=str(exc), type="unknown_provider")
            )
            continue
        if provider.address(to) is None:
            errors.append(
                FieldError(
                    path=f"{path}.channel",
                    message=f"`to` has no address for the {step.channel.value} channel"
                    f" (provider {provider.name})",
                    type="missing_address",
                )
            )
        if not _has_body(step.channel, channel_content(stored, step.channel)):
            errors.append(
                FieldError(
                    path="body.content",
                    message=f"no content for the {step.channel.value} channel",
                    type="missing_content",
                )
            )
        spec: dict[str, Any] = {
            "channel": step.channel.value,
            "provider": provider.name,
            "timeout": step.timeout or settings.default_timeouts[step.channel],
            "success_on": (step.success_on or default_success_on(step.channel, provider)).value,
        }
        if not confirms_delivery(provider):
            # Nothing can be reported after acceptance: it delivers at once (see `decide`).
            spec["receipts"] = False
        steps.append(spec)
    if errors:
        raise InvalidRequest(detail="the cascade cannot be sent as given", errors=errors)
    if request.reorder:
        steps[0]["reorder"] = True  # looked at by the engine before the first step
    return steps


def confirms_delivery(provider: Provider) -> bool:
    """Whether the provider reports anything after accepting a send (Telegram does not)."""
    return bool(getattr(provider, "confirms_delivery", True))


def default_success_on(channel: Channel, provider: Provider) -> SuccessOn:
    # Providers without receipts (Telegram) can only ever confirm acceptance.
    if not confirms_delivery(provider):
        return SuccessOn.ACCEPTED
    return DEFAULT_SUCCESS_ON[channel]


def _has_body(channel: Channel, content: Mapping[str, Any]) -> bool:
    if channel is Channel.EMAIL:
        return bool(content.get("text") or content.get("html"))
    if channel is Channel.PUSH:
        return bool(content.get("text") or content.get("title"))
    if channel is Channel.MESSENGER:
        return bool(content.get("text") or content.get("template_name"))
    return bool(content.get("text"))


def inline_content(request: SendMessageRequest) -> dict[str, Any]:
    return request.content.model_dump(exclude_none=True, exclude={"template", "data", "locale"})


async def resolve_content(request: SendMessageRequest, lookup: TemplateLookup) -> dict[str, Any]:
    """What the message will send: inline content, or its template rendered per channel."""
    content = request.content
    if content.template is None:
        return inline_content(request)
    template = await lookup.find(content.template, content.locale)
    if template is None:
        raise InvalidRequest(
            errors=[
                FieldError(
                    path="body.content.template",
                    message=f"no template {content.template!r} in locale"
                    f" {content.locale or 'default'} or its fallbacks",
                    type="unknown_template",
                )
            ]
        )
    return render_template(template, (step.channel for step in request.cascade), content.data)


def resolve_schedule(request: SendMessageRequest, at: datetime) -> dict[str, Any]:
    """The status and scheduling columns of a new message: `queued` until `send_at`."""
    if request.expires_at is not None and request.expires_at <= at:
        raise InvalidRequest(
            errors=[FieldError(path="body.expires_at", message="already past", type="in_the_past")]
        )
    scheduled = request.send_at is not None and request.send_at > at
    start = request.send_at if scheduled and request.send_at is not None else at
    return {
        "status": (MessageStatus.QUEUED if scheduled else MessageStatus.ACCEPTED).value,
        "send_at": request.send_at,
        "expires_at": request.expires_at,
        "not_before": request.send_at if scheduled else None,
        # The delivery engine takes it then (its first step, or its expiry if sooner).
        "due_at": start if request.expires_at is None else min(start, request.expires_at),
    }


async def prepare_message(
    tenant_id: uuid.UUID,
    request: SendMessageRequest,
    registry: ProviderRegistry,
    settings: Settings,
    lookup: TemplateLookup,
    at: datetime,
) -> dict[str, Any]:
    """The new message's row, or InvalidRequest: everything but the insert."""
    content = await resolve_content(request, lookup)
    return message_row(tenant_id, request, registry, settings, content, at)


def message_row(
    tenant_id: uuid.UUID,
    request: SendMessageRequest,
    registry: ProviderRegistry,
    settings: Settings,
    content: dict[str, Any],
    at: datetime,
) -> dict[str, Any]:
    """`prepare_message` once the content is known (inline, or a template rendered)."""
    recipient = request.to.model_dump(exclude_none=True)
    cascade = resolve_cascade(request, registry, settings, content, recipient)
    return {
        "id": new_id(),
        "category": request.category.value,
        "tenant_id": tenant_id,
        "recipient": recipient,
        "content": content,
        "cascade": cascade,
        "metadata": request.metadata,
        "current_step": 0,
        "seq": 1,
        "created_at": at,
        "updated_at": at,
        **resolve_schedule(request, at),
    }


def wake_for(tx: Transaction, row: Mapping[str, Any]) -> None:
    """A message due now wakes its category's delivery engine after commit (a scheduled
    one is found by the engine's look at the next `due_at`)."""
    if row["not_before"] is None:
        tx.wake_after_commit(row["category"])


def request_fingerprint(request: SendMessageRequest) -> bytes:
    canonical = orjson.dumps(request.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """A validated, prepared message, ready to be written (alone or in a group commit)."""

    row: dict[str, Any]
    accepted: AcceptedMessage
    idempotency_key: str | None = None
    fingerprint: bytes | None = None


def pending_message(
    row: dict[str, Any], request: SendMessageRequest, idempotency_key: str | None
) -> PendingMessage:
    accepted = AcceptedMessage.model_construct(
        id=to_public(IdPrefix.MESSAGE, row["id"]),
        status=MessageStatus(row["status"]),
        category=request.category,
        created_at=row["created_at"],
    )
    if idempotency_key is None:
        return PendingMessage(row, accepted)
    return PendingMessage(row, accepted, idempotency_key, request_fingerprint(request))


async def accept_pending(
    tx: Transaction, items: Sequence[PendingMessage]
) -> list[Acceptance | ProblemError]:
    """Write every new message of `items` at once; each item's outcome, in order.

    Per (tenant, key) the first item claims the key and the others replay it (same body)
    or conflict; a key already in the ledger, or committed meanwhile by a concurrent
    transaction (the claim waits for it), replays or conflicts for each item carrying it.
    The engines are woken and webhooks told after commit."""
    owners: dict[tuple[uuid.UUID, str], int] = {}
    written: list[PendingMessage] = []
    for index, item in enumerate(items):
        if item.idempotency_key is not None:
            owner = (item.row["tenant_id"], item.idempotency_key)
            if owner in owners:
                continue
            owners[owner] = index
        written.append(item)
    claims = [
        ledger.KeyClaim(
            tenant_id,
            key,
            items[index].fingerprint or b"",
            items[index].row["id"],
            items[index].accepted.model_dump(mode="json"),
            items[index].row["created_at"],
        )
        for (tenant_id, key), index in sorted(owners.items())  # one lock order for all
    ]
    claimed = await ledger.insert_accepted_messages(tx.conn, [item.row for item in written], claims)
    stored = await ledger.stored_keys(
        tx.conn,
        [(c.tenant_id, c.key) for c in claims if c.message_id not in claimed],
    )
    outcomes: list[Acceptance | ProblemError] = []
    for index, item in enumerate(items):
        key = item.idempotency_key
        if key is None:
            outcomes.append(Acceptance(item.accepted, replayed=False))
            continue
        owner = (item.row["tenant_id"], key)
        earlier = stored.get(owner)
        if earlier is None:
            if owners[owner] == index:
                outcomes.append(Acceptance(item.accepted, replayed=False))
                continue
            first = items[owners[owner]]
            earlier = ledger.StoredKey(first.fingerprint or b"", first.accepted.model_dump())
        if earlier.request_hash != item.fingerprint:
            outcomes.append(Conflict("this Idempotency-Key was used with a different request body"))
        else:
            outcomes.append(Acceptance(AcceptedMessage.model_validate(earlier.response), True))
    for item in written:
        row = item.row
        if item.idempotency_key is not None and row["id"] not in claimed:
            continue
        wake_for(tx, row)
        await notify_after_commit(tx, row["tenant_id"], row["id"], row["category"])
    return outcomes


async def accept_message(
    tx: Transaction,
    tenant_id: uuid.UUID,
    request: SendMessageRequest,
    idempotency_key: str | None,
    registry: ProviderRegistry,
    settings: Settings,
    at: datetime,
) -> Acceptance:
    """One message in `tx` (the API's writer accepts many at once the same way)."""
    row = await prepare_message(
        tenant_id, request, registry, settings, TemplateLookup(tx.conn, tenant_id, settings), at
    )
    (outcome,) = await accept_pending(tx, [pending_message(row, request, idempotency_key)])
    if isinstance(outcome, ProblemError):
        raise outcome
    return outcome


async def get_message_view(tx: Transaction, tenant_id: uuid.UUID, public_id: str) -> MessageView:
    message_id = from_public(IdPrefix.MESSAGE, public_id)
    message = await ledger.get_message(tx.conn, message_id, tenant_id) if message_id else None
    if message is None:
        raise NotFound(f"no message {public_id}")
    attempts = await ledger.list_attempts(tx.conn, message.id)
    events = await ledger.list_events(tx.conn, message.id)
    stopped = next(
        (
            e["detail"] or {}
            for e in reversed(events)
            if e["attempt_id"] is None and e["status"] == MessageStatus.SUPPRESSED
        ),
        {},
    )
    return MessageView(
        id=public_id,
        category=message.category,
        status=message.status,
        delivered_channel=message.delivered_channel,
        delivered_step=message.delivered_step,
        current_step=message.current_step,
        to=message.recipient,
        cascade=[CascadeStepView.model_validate(step) for step in message.cascade],
        metadata=message.metadata,
        created_at=message.created_at,
        updated_at=message.updated_at,
        completed_at=message.completed_at,
        send_at=message.send_at,
        expires_at=message.expires_at,
        suppressed_reason=stopped.get("code")
        or ("address_suppressed" if message.status is MessageStatus.SUPPRESSED else None),
        duplicate_of=stopped.get("duplicate_of"),
        attempts=[attempt_view(a) for a in attempts],
        cost=None if message.unpriced else message.cost,
        currency=next((a.currency for a in attempts if a.currency), None),
        events=[
            EventView(
                seq=e["seq"],
                at=e["at"],
                occurred_at=e["occurred_at"],
                status=e["status"],
                source=e["source"],
                attempt=to_public(IdPrefix.ATTEMPT, e["attempt_id"]) if e["attempt_id"] else None,
                step=e["step"],
                detail=e["detail"],
            )
            for e in events
        ],
    )


def attempt_view(a: AttemptRow) -> AttemptView:
    return AttemptView(
        id=to_public(IdPrefix.ATTEMPT, a.id),
        step=a.step,
        channel=Channel(a.channel),
        provider=a.provider,
        status=a.status,
        provider_message_id=a.provider_message_id,
        error=ErrorView(code=a.error_code, detail=a.error_detail) if a.error_code else None,
        tries=a.tries,
        created_at=a.created_at,
        sent_at=a.sent_at,
        completed_at=a.completed_at,
        deadline_at=a.deadline_at,
        segments=a.segments,
        cost=a.cost,
        currency=a.currency,
    )


async def cancel_message(
    tx: Transaction, tenant_id: uuid.UUID, public_id: str, at: datetime
) -> MessageView:
    """Cancel a message that has not finished; 409 once it has."""
    message_id = from_public(IdPrefix.MESSAGE, public_id)
    message = await ledger.get_message(tx.conn, message_id, tenant_id) if message_id else None
    if message is None:
        raise NotFound(f"no message {public_id}")
    locked = await ledger.lock_message(tx.conn, message.id)
    assert locked is not None
    if not await stop_now(tx, locked, Stop.CANCEL, source="api", at=at, code="cancelled"):
        raise Conflict(f"the message is already {locked.status.value}")
    return await get_message_view(tx, tenant_id, public_id)
