"""Webhook endpoints, the fan-out of ledger events to them, and delivery bookkeeping.

Flow: a transaction that appends ledger events calls `notify_after_commit`, which (only
for tenants with endpoints) asks for a `dispatch_webhooks` job after commit. Dispatch
turns the message's events past its cursor into deliveries, one per matching endpoint,
in one transaction with the cursor move. Each delivery is claimed, sent outside any
transaction, and recorded; failures are retried on `retries.RETRY_SCHEDULE`. The sweeper
covers every lost job: events past the cursors and deliveries overdue.
"""

from __future__ import annotations

import functools
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from app.db import Transaction
from app.errors import Conflict, FieldError, InvalidRequest, NotFound
from app.ids import IdPrefix, from_public, new_id, to_public
from app.ledger import repository as ledger
from app.ledger.repository import MessageRow
from app.observability import count_webhook_delivery
from app.pagination import decode_cursor, encode_cursor, one_cursor
from app.queue import deliver_job, dispatch_job
from app.settings import Settings
from app.webhooks import repository as repo
from app.webhooks.events import (
    TEST_EVENT_TYPE,
    EventType,
    event_type,
    iso,
    message_event_data,
    payload,
)
from app.webhooks.repository import DeliveryStatus, EndpointRow, LedgerEvent
from app.webhooks.retries import DISABLE_AFTER, next_retry_delay, should_disable
from app.webhooks.schemas import (
    CreateEndpointRequest,
    DeliveryPage,
    DeliveryView,
    EndpointView,
    ReplayRequest,
    UpdateEndpointRequest,
)
from app.webhooks.sender import Outcome
from app.webhooks.signing import new_secret
from app.webhooks.ssrf import UnsafeUrl, check_url

log = structlog.get_logger()

MAX_ENDPOINTS_PER_TENANT = 50
SECRET_OVERLAP = timedelta(hours=24)
# A claimed attempt not recorded by then (crashed worker) is retried by the sweeper.
IN_FLIGHT_LEASE = timedelta(seconds=60)
# A deferred job may fire a hair before its time; within this it counts as due.
EARLY_SLACK = timedelta(seconds=1)
SWEEP_BATCH = 1000


# The hook the ledger's writers call


async def tenant_has_endpoints(tx: Transaction, tenant_id: uuid.UUID) -> bool:
    """Cached per process for a few seconds (`EndpointPresence`), when `tx` has the cache."""
    presence = tx.endpoint_presence
    if presence is None:
        return await repo.has_enabled_endpoint(tx.conn, tenant_id)
    cached = presence.get(tenant_id)
    if cached is not None:
        return cached
    generation = presence.generation
    found = await repo.has_enabled_endpoint(tx.conn, tenant_id)
    presence.remember(tenant_id, found, generation)
    return found


def forget_after_commit(tx: Transaction, tenant_id: uuid.UUID) -> None:
    """The tenant's endpoints change in `tx`: drop the cached answer once they are visible."""
    if tx.endpoint_presence is not None:
        tx.after_commit(functools.partial(tx.endpoint_presence.forget, tenant_id))


async def notify_after_commit(
    tx: Transaction, tenant_id: uuid.UUID, message_id: uuid.UUID, category: str
) -> None:
    """Call wherever ledger events are appended: dispatches them once the tx commits."""
    if not await tenant_has_endpoints(tx, tenant_id):
        return
    public_id = to_public(IdPrefix.MESSAGE, message_id)
    # Two changes to one message in one transaction sit close together: a look at the last
    # few jobs dedupes them in O(1) (a batch of 1000 messages must not scan quadratically;
    # a duplicate that slips through only costs a no-op dispatch).
    recent = tx.jobs[-8:]
    if any(j.function == "dispatch_webhooks" and j.args == (public_id,) for j in recent):
        return
    tx.enqueue_after_commit(dispatch_job(message_id, category))


# Endpoints (API)


def endpoint_view(endpoint: EndpointRow) -> EndpointView:
    return EndpointView(
        id=to_public(IdPrefix.WEBHOOK_ENDPOINT, endpoint.id),
        url=endpoint.url,
        description=endpoint.description,
        event_types=endpoint.event_types,
        categories=endpoint.categories,
        enabled=endpoint.disabled_at is None,
        disabled_at=endpoint.disabled_at,
        disabled_reason=endpoint.disabled_reason,
        failing_since=endpoint.failing_since,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
    )


async def _checked_url(url: str, settings: Settings) -> str:
    """The URL normalised as the HTTP client will read it, or 422 naming `body.url`."""
    try:
        return await check_url(url, settings.webhooks_allow_loopback_http)
    except UnsafeUrl as exc:
        raise InvalidRequest(
            detail="the webhook URL is not allowed",
            errors=[FieldError(path="body.url", message=str(exc), type="unsafe_url")],
        ) from None


async def create_endpoint(
    tx: Transaction,
    tenant_id: uuid.UUID,
    request: CreateEndpointRequest,
    settings: Settings,
    at: datetime,
) -> tuple[EndpointRow, str]:
    url = await _checked_url(request.url, settings)
    if await repo.count_endpoints(tx.conn, tenant_id) >= MAX_ENDPOINTS_PER_TENANT:
        raise Conflict(f"a tenant can have at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints")
    secret = new_secret()
    endpoint = await repo.insert_endpoint(
        tx.conn,
        {
            "id": new_id(),
            "tenant_id": tenant_id,
            "url": url,
            "description": request.description,
            "event_types": _values(request.event_types),
            "categories": _values(request.categories),
            "secret": secret,
            "created_at": at,
            "updated_at": at,
        },
    )
    forget_after_commit(tx, tenant_id)
    return endpoint, secret


def _values(items: list[Any] | None) -> list[str] | None:
    return [str(item.value) for item in items] if items is not None else None


async def get_endpoint(
    tx: Transaction, tenant_id: uuid.UUID, public_id: str, *, lock: bool = False
) -> EndpointRow:
    endpoint_id = from_public(IdPrefix.WEBHOOK_ENDPOINT, public_id)
    endpoint = (
        await repo.get_endpoint(tx.conn, tenant_id, endpoint_id, lock=lock) if endpoint_id else None
    )
    if endpoint is None:
        raise NotFound(f"no webhook endpoint {public_id}")
    return endpoint


async def list_endpoints(tx: Transaction, tenant_id: uuid.UUID) -> list[EndpointRow]:
    return await repo.list_endpoints(tx.conn, tenant_id)


async def update_endpoint(
    tx: Transaction,
    tenant_id: uuid.UUID,
    public_id: str,
    request: UpdateEndpointRequest,
    settings: Settings,
    at: datetime,
) -> EndpointRow:
    endpoint = await get_endpoint(tx, tenant_id, public_id, lock=True)
    given = request.model_fields_set
    values: dict[str, Any] = {}
    if "url" in given and request.url is not None and request.url != endpoint.url:
        values["url"] = await _checked_url(request.url, settings)
    if "description" in given and request.description is not None:
        values["description"] = request.description
    if "event_types" in given:
        values["event_types"] = _values(request.event_types)
    if "categories" in given:
        values["categories"] = _values(request.categories)
    if request.enabled is True and endpoint.disabled_at is not None:
        values.update(disabled_at=None, disabled_reason=None, failing_since=None)
    elif request.enabled is False and endpoint.disabled_at is None:
        values.update(disabled_at=at, disabled_reason="disabled through the API")
        await repo.fail_pending_deliveries(tx.conn, endpoint.id, at, "endpoint disabled")
    forget_after_commit(tx, tenant_id)
    if not values:
        return endpoint
    return await repo.update_endpoint(tx.conn, endpoint.id, at, **values)


async def delete_endpoint(tx: Transaction, tenant_id: uuid.UUID, public_id: str) -> None:
    endpoint_id = from_public(IdPrefix.WEBHOOK_ENDPOINT, public_id)
    if endpoint_id is None or not await repo.delete_endpoint(tx.conn, tenant_id, endpoint_id):
        raise NotFound(f"no webhook endpoint {public_id}")
    forget_after_commit(tx, tenant_id)


async def rotate_secret(
    tx: Transaction, tenant_id: uuid.UUID, public_id: str, at: datetime
) -> tuple[str, datetime]:
    """A new secret; the one it replaces keeps signing beside it for 24 hours."""
    endpoint = await get_endpoint(tx, tenant_id, public_id, lock=True)
    secret = new_secret()
    expires = at + SECRET_OVERLAP
    await repo.update_endpoint(
        tx.conn,
        endpoint.id,
        at,
        secret=secret,
        previous_secret=endpoint.secret,
        previous_secret_expires_at=expires,
    )
    return secret, expires


# Dispatch: ledger events -> deliveries


def _attempt_data(event: LedgerEvent) -> dict[str, Any] | None:
    if event.attempt_id is None:
        return None
    detail = event.detail or {}
    return {
        "id": to_public(IdPrefix.ATTEMPT, event.attempt_id),
        "step": event.step,
        "channel": event.channel,
        "provider": event.provider,
        # The attempt's status as of this event, not as of now.
        "status": event.status,
        "error": (
            {"code": detail["code"], "detail": detail.get("detail")} if "code" in detail else None
        ),
    }


def _event_payload(message: MessageRow, event: LedgerEvent, type_: str) -> str:
    return payload(
        type_,
        event.at,
        message_event_data(
            message_id=to_public(IdPrefix.MESSAGE, message.id),
            category=message.category,
            status=message.status.value,
            sequence=event.seq,
            delivered_channel=message.delivered_channel,
            metadata=message.metadata,
            attempt=_attempt_data(event),
        ),
    )


async def dispatch_message_events(tx: Transaction, message_id: uuid.UUID, at: datetime) -> int:
    """Deliveries for the message's events past its cursor; returns how many were made."""
    cursor = await repo.lock_cursor(tx.conn, message_id, at)
    new_events = await repo.ledger_events_after(tx.conn, message_id, cursor)
    if not new_events:
        return 0
    message = await ledger.get_message(tx.conn, message_id)
    if message is None:
        return 0
    endpoints = await repo.enabled_endpoints(tx.conn, message.tenant_id)
    created = 0
    for event in new_events:
        type_ = event_type(event.status, event.attempt_id is not None)
        targets = [
            endpoint
            for endpoint in endpoints
            # An endpoint receives what happened from its creation on.
            if endpoint.created_at <= event.at
            and endpoint.subscription.wants(type_, message.category)
        ]
        if not targets:
            continue
        event_id = await repo.insert_event(
            tx.conn,
            {
                "id": new_id(),
                "tenant_id": message.tenant_id,
                "message_id": message.id,
                "category": message.category,
                "ledger_event_id": event.id,
                "type": type_,
                "payload": _event_payload(message, event, type_),
                "created_at": at,
            },
        )
        created += await _deliveries(tx, message.tenant_id, event_id, targets, message.category, at)
    await repo.advance_cursor(tx.conn, message_id, new_events[-1].seq, at)
    return created


async def _deliveries(
    tx: Transaction,
    tenant_id: uuid.UUID,
    event_id: uuid.UUID,
    targets: list[EndpointRow],
    category: str,
    at: datetime,
) -> int:
    """A pending delivery of the event per endpoint, each sent by a job after commit."""
    created = 0
    for endpoint in targets:
        delivery_id = await repo.insert_delivery(
            tx.conn,
            {
                "id": new_id(),
                "tenant_id": tenant_id,
                "endpoint_id": endpoint.id,
                "event_id": event_id,
                "status": DeliveryStatus.PENDING,
                "attempts": 0,
                "schedule_start": 0,
                "next_attempt_at": at,
                "created_at": at,
                "updated_at": at,
            },
        )
        if delivery_id is not None:
            tx.enqueue_after_commit(deliver_job(delivery_id, 0, category))
            created += 1
    return created


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """A stored inbound message, as the tenant it answers sees it."""

    inbound_id: uuid.UUID
    tenant_id: uuid.UUID
    # The message it answers: the event is filed under it (its category filters it).
    message_id: uuid.UUID
    category: str
    received_at: datetime
    data: dict[str, Any]


async def dispatch_inbound(tx: Transaction, inbound: InboundEvent, at: datetime) -> int:
    """`inbound.received` deliveries, made in the transaction that stores the inbound
    message (no job or sweep between: nothing can lose them before commit). The
    endpoints are read uncached: a stale "no endpoints" would never be swept up."""
    type_ = EventType.INBOUND_RECEIVED.value
    targets = [
        endpoint
        for endpoint in await repo.enabled_endpoints(tx.conn, inbound.tenant_id)
        if endpoint.created_at <= inbound.received_at
        and endpoint.subscription.wants(type_, inbound.category)
    ]
    if not targets:
        return 0
    event_id = await repo.insert_event(
        tx.conn,
        {
            "id": new_id(),
            "tenant_id": inbound.tenant_id,
            "message_id": inbound.message_id,
            "category": inbound.category,
            "inbound_id": inbound.inbound_id,
            "type": type_,
            "payload": payload(type_, inbound.received_at, inbound.data),
            "created_at": at,
        },
    )
    return await _deliveries(tx, inbound.tenant_id, event_id, targets, inbound.category, at)


# Delivery: claim, send (outside any transaction), record


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    tenant_id: uuid.UUID
    attempts: int  # counting this one
    schedule_start: int
    category: str
    url: str
    webhook_id: str
    body: str
    keys: list[str]


async def begin_delivery(
    tx: Transaction, delivery_id: uuid.UUID, attempt: int, at: datetime
) -> DeliveryPlan | None:
    """Claim attempt number `attempt + 1`, or None when it is not due or already taken.

    The claim is committed before the request leaves and holds the delivery for
    IN_FLIGHT_LEASE: a worker that dies mid-request leaves it to the sweeper.
    """
    claimed = await repo.claim_delivery(
        tx.conn, delivery_id, attempt, at, due_by=at + EARLY_SLACK, lease_until=at + IN_FLIGHT_LEASE
    )
    if claimed is None:
        await repo.fail_if_endpoint_disabled(tx.conn, delivery_id, at)
        return None
    return DeliveryPlan(
        delivery_id=claimed.id,
        endpoint_id=claimed.endpoint_id,
        tenant_id=claimed.tenant_id,
        attempts=claimed.attempts,
        schedule_start=claimed.schedule_start,
        category=claimed.category,
        url=claimed.url,
        webhook_id=to_public(IdPrefix.EVENT, claimed.event_id),
        body=claimed.payload,
        keys=claimed.signing_keys(at),
    )


async def record_delivery_result(
    tx: Transaction,
    plan: DeliveryPlan,
    outcome: Outcome,
    at: datetime,
    rand: float | None = None,
) -> str | None:
    """Store the answer and decide what follows; returns the delivery's new status (None
    when the delivery moved on meanwhile, e.g. its endpoint was deleted)."""
    answer: dict[str, Any] = {
        "response_status": outcome.status_code,
        "response_body": outcome.response_body,
        "latency_ms": outcome.latency_ms,
        "error": outcome.error,
    }
    if outcome.succeeded:
        recorded = await repo.record_attempt(
            tx.conn,
            plan.delivery_id,
            plan.attempts,
            at,
            status=DeliveryStatus.SUCCEEDED,
            next_attempt_at=None,
            **answer,
        )
        if not recorded:
            return None
        await repo.clear_failing(tx.conn, plan.endpoint_id)
        tx.after_commit(functools.partial(count_webhook_delivery, "succeeded"))
        return DeliveryStatus.SUCCEEDED

    failing_since, disabled_at = await repo.record_failing(tx.conn, plan.endpoint_id, at)
    delay = next_retry_delay(
        plan.attempts - plan.schedule_start, random.random() if rand is None else rand
    )
    if disabled_at is None and should_disable(failing_since, at):
        assert failing_since is not None
        reason = (
            f"every attempt failed for {DISABLE_AFTER.days} days (since {iso(failing_since)});"
            f" last error: {outcome.error}"
        )
        await repo.disable_endpoint(tx.conn, plan.endpoint_id, at, reason)
        await repo.fail_pending_deliveries(tx.conn, plan.endpoint_id, at, "endpoint disabled")
        forget_after_commit(tx, plan.tenant_id)
        log.warning(
            "webhook_endpoint_disabled",
            endpoint=to_public(IdPrefix.WEBHOOK_ENDPOINT, plan.endpoint_id),
        )
        delay = None
    elif disabled_at is not None:
        delay = None
    if delay is None:
        status = DeliveryStatus.FAILED
        answer.update(status=status, next_attempt_at=None)
    else:
        status = DeliveryStatus.PENDING
        answer["next_attempt_at"] = at + delay
    if not await repo.record_attempt(tx.conn, plan.delivery_id, plan.attempts, at, **answer):
        return None
    outcome_label = "failed" if delay is None else "retrying"
    tx.after_commit(functools.partial(count_webhook_delivery, outcome_label))
    if delay is not None:
        tx.enqueue_after_commit(deliver_job(plan.delivery_id, plan.attempts, plan.category, delay))
    return status


# Replay and the delivery log


async def replay(
    tx: Transaction,
    tenant_id: uuid.UUID,
    endpoint_public_id: str,
    request: ReplayRequest,
    at: datetime,
) -> int:
    """Send again on a fresh retry schedule: one delivery, or every finished one (succeeded
    or failed) since a time."""
    endpoint = await _enabled_endpoint(tx, tenant_id, endpoint_public_id)
    if request.since is not None:
        return await _requeue_since(tx, endpoint, request.since, at, failed_only=False)
    assert request.delivery_id is not None
    delivery_id = from_public(IdPrefix.WEBHOOK_DELIVERY, request.delivery_id)
    delivery = await repo.lock_delivery(tx.conn, delivery_id, tenant_id) if delivery_id else None
    if delivery is None or delivery.endpoint_id != endpoint.id:
        raise NotFound(f"no delivery {request.delivery_id} for this endpoint")
    if delivery.status == DeliveryStatus.PENDING:
        raise Conflict("the delivery is still pending; its next attempt is scheduled")
    await repo.update_delivery(
        tx.conn,
        delivery.id,
        at,
        status=DeliveryStatus.PENDING,
        schedule_start=delivery.attempts,
        next_attempt_at=at,
    )
    category = await repo.event_category(tx.conn, delivery.event_id)
    tx.enqueue_after_commit(deliver_job(delivery.id, delivery.attempts, category))
    return 1


async def recover(
    tx: Transaction, tenant_id: uuid.UUID, endpoint_public_id: str, since: datetime, at: datetime
) -> int:
    """Send again, on a fresh retry schedule, every failed delivery since a time."""
    endpoint = await _enabled_endpoint(tx, tenant_id, endpoint_public_id)
    return await _requeue_since(tx, endpoint, since, at, failed_only=True)


async def _enabled_endpoint(
    tx: Transaction, tenant_id: uuid.UUID, endpoint_public_id: str
) -> EndpointRow:
    endpoint = await get_endpoint(tx, tenant_id, endpoint_public_id)
    if endpoint.disabled_at is not None:
        raise Conflict("the endpoint is disabled: enable it (PATCH enabled=true) first")
    return endpoint


async def _requeue_since(
    tx: Transaction, endpoint: EndpointRow, since: datetime, at: datetime, *, failed_only: bool
) -> int:
    requeued = await repo.requeue_since(tx.conn, endpoint.id, since, at, failed_only=failed_only)
    for requeued_id, attempts, category in requeued:
        tx.enqueue_after_commit(deliver_job(requeued_id, attempts, category))
    return len(requeued)


async def delivery_page(
    tx: Transaction,
    tenant_id: uuid.UUID,
    endpoint_public_id: str,
    *,
    status: str | None,
    cursor: str | None,
    before: str | None,
    limit: int,
) -> DeliveryPage:
    endpoint = await get_endpoint(tx, tenant_id, endpoint_public_id)
    rows = await repo.delivery_log(
        tx.conn, endpoint.id, status=status, before=_older_than(cursor, before), limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    views = [
        DeliveryView(
            id=to_public(IdPrefix.WEBHOOK_DELIVERY, row.delivery.id),
            event_id=to_public(IdPrefix.EVENT, row.delivery.event_id),
            event_type=row.event_type,
            message_id=to_public(IdPrefix.MESSAGE, row.message_id),
            status=row.delivery.status,
            attempts=row.delivery.attempts,
            response_status_code=row.delivery.response_status,
            latency_ms=row.delivery.latency_ms,
            response_body=row.delivery.response_body,
            error=row.delivery.error,
            next_retry_at=(
                row.delivery.next_attempt_at
                if row.delivery.status == DeliveryStatus.PENDING
                else None
            ),
            last_attempt_at=row.delivery.last_attempt_at,
            created_at=row.delivery.created_at,
        )
        for row in rows
    ]
    next_cursor = encode_cursor("whd", rows[-1].delivery.id) if more else None
    return DeliveryPage(data=views, next_cursor=next_cursor)


def _older_than(cursor: str | None, before: str | None) -> uuid.UUID | None:
    """The delivery a page starts below: from `cursor`, or from the deprecated `before`
    (a cursor or, as it used to be, a delivery id)."""
    given = one_cursor(cursor, alias=("before", before))
    if given is None:
        return None
    if (
        before is not None
        and (delivery_id := from_public(IdPrefix.WEBHOOK_DELIVERY, before)) is not None
    ):
        return delivery_id
    param = "cursor" if before is None else "before"
    return decode_cursor(given, "whd", (uuid.UUID,), param=param)[0]


# The test event


@dataclass(frozen=True, slots=True)
class TestPlan:
    url: str
    webhook_id: str
    body: str
    keys: list[str]


async def plan_test_event(
    tx: Transaction, tenant_id: uuid.UUID, public_id: str, at: datetime
) -> TestPlan:
    endpoint = await get_endpoint(tx, tenant_id, public_id)
    return TestPlan(
        url=endpoint.url,
        webhook_id=to_public(IdPrefix.EVENT, new_id()),
        body=payload(TEST_EVENT_TYPE, at, {"endpoint_id": public_id}),
        keys=endpoint.signing_keys(at),
    )


# Sweep


@dataclass(frozen=True, slots=True)
class SweepResult:
    dispatched: int
    requeued: int


async def sweep(tx: Transaction, at: datetime, grace: timedelta) -> SweepResult:
    """Dispatch events whose job was lost and re-enqueue overdue deliveries.

    Covers the ledger's events past a high-water mark up to the last one older than
    `grace` (a younger event's own dispatch job may still be on its way), then moves the
    mark there. Dispatch happens here, inline: its result is in Postgres, not in Redis.
    """
    cutoff = at - grace
    mark = await repo.lock_sweep_mark(tx.conn)
    settled = await repo.last_settled_event(tx.conn, mark, cutoff)
    dispatched = 0
    if settled is not None:
        lagging = await repo.undispatched_messages(tx.conn, mark, settled, SWEEP_BATCH)
        for message_id in lagging:
            await dispatch_message_events(tx, message_id, at)
        dispatched = len(lagging)
        # A full batch may have left some: the next sweep scans the same range again.
        if len(lagging) < SWEEP_BATCH:
            await repo.set_sweep_mark(tx.conn, settled)
    overdue = await repo.overdue_deliveries(tx.conn, cutoff, SWEEP_BATCH)
    for delivery_id, attempts, category in overdue:
        tx.enqueue_after_commit(deliver_job(delivery_id, attempts, category))
    return SweepResult(dispatched, len(overdue))
