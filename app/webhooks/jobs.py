"""The arq jobs on the `cascade:webhooks` queue; each is idempotent.

Time comes from `ctx["clock"]` when given (tests advance it instead of sleeping), else
the wall clock. The SSRF-checked HTTP client is the Runtime's (`Runtime.webhook_http`),
closed with it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from app.ids import IdPrefix, from_public
from app.runtime import Runtime, utcnow
from app.webhooks import service
from app.webhooks.sender import post_signed

log = structlog.get_logger()


def _runtime(ctx: dict[str, Any]) -> Runtime:
    runtime: Runtime = ctx["runtime"]
    return runtime


def _clock(ctx: dict[str, Any]) -> Callable[[], datetime]:
    clock: Callable[[], datetime] = ctx.get("clock", utcnow)
    return clock


async def dispatch_webhooks(ctx: dict[str, Any], message_id: str) -> None:
    rt, now = _runtime(ctx), _clock(ctx)
    uid = from_public(IdPrefix.MESSAGE, message_id)
    if uid is None:
        return
    async with rt.transaction() as tx:
        created = await service.dispatch_message_events(tx, uid, now())
    if created:
        log.info("webhooks_dispatched", message_id=message_id, deliveries=created)


async def deliver_webhook(ctx: dict[str, Any], delivery_id: str, attempt: int) -> None:
    rt, now = _runtime(ctx), _clock(ctx)
    uid = from_public(IdPrefix.WEBHOOK_DELIVERY, delivery_id)
    if uid is None:
        return
    async with rt.transaction() as tx:
        plan = await service.begin_delivery(tx, uid, attempt, now())
    if plan is None:
        return
    outcome = await post_signed(
        rt.webhook_http, plan.url, plan.webhook_id, plan.body, plan.keys, now()
    )
    async with rt.transaction() as tx:
        status = await service.record_delivery_result(tx, plan, outcome, now())
    log.info(
        "webhook_attempt",
        delivery_id=delivery_id,
        attempt=attempt + 1,
        status_code=outcome.status_code,
        latency_ms=outcome.latency_ms,
        error=outcome.error,
        delivery_status=status,
    )


async def sweep_webhooks(ctx: dict[str, Any]) -> None:
    rt, now = _runtime(ctx), _clock(ctx)
    async with rt.transaction() as tx:
        result = await service.sweep(tx, now(), rt.settings.sweep_grace)
    if result.dispatched or result.requeued:
        log.info("webhooks_swept", dispatched=result.dispatched, requeued=result.requeued)
