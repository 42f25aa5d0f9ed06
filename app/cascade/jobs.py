"""The arq jobs that drive cascades. Each one is idempotent: running it twice sends once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError

from app.cascade import service
from app.ids import from_public
from app.runtime import Runtime, utcnow
from providers.base import (
    Cancellable,
    ProviderError,
    Rejected,
    SendResult,
    TransientProviderError,
)
from providers.registry import UnknownProvider

log = structlog.get_logger()

T = TypeVar("T")


def _runtime(ctx: dict[str, Any]) -> Runtime:
    runtime: Runtime = ctx["runtime"]
    return runtime


async def send_step(ctx: dict[str, Any], message_id: str, step: int) -> None:
    rt = _runtime(ctx)
    uid = from_public("msg", message_id)
    if uid is None:
        return
    async with rt.transaction() as tx:
        plan = await service.begin_send(tx, rt.providers, rt.settings, uid, step, utcnow())
    if plan is None:
        return
    structlog.contextvars.bind_contextvars(
        message_id=message_id, attempt=plan.outbound.attempt_id, provider=plan.provider.name
    )
    result = await _send_guarded(rt, plan)
    async with rt.transaction() as tx:
        await service.record_send_result(tx, rt.settings, plan, result, utcnow())
    log.info("step_sent", step=step, result=type(result).__name__)
    structlog.contextvars.unbind_contextvars("message_id", "attempt", "provider")


# A Redis that hangs (mid-restart) must not hold a claimed send until arq's job timeout
# cancels it: that would leave the attempt `sending`, unsent or with its answer lost.
GUARDS_TIMEOUT_SECONDS = 1.0
# Short waits for a rate-limit slot happen in the job; longer ones re-enqueue it deferred.
MAX_INLINE_RATE_WAIT = 1.0


async def _send_guarded(rt: Runtime, plan: service.SendPlan) -> SendResult | TransientProviderError:
    account = rt.providers.account(plan.provider.name)
    guards = rt.send_guards
    try:
        async with asyncio.timeout(GUARDS_TIMEOUT_SECONDS):
            admission = await guards.admit(account)
        if admission.circuit_open:
            return Rejected(
                "circuit_open",
                f"{account.name} is failing with transient errors; skipped for now",
            )
        wait = admission.wait
        while 0 < wait <= MAX_INLINE_RATE_WAIT:
            await asyncio.sleep(wait)
            async with asyncio.timeout(GUARDS_TIMEOUT_SECONDS):
                wait = await guards.wait_for_rate(account)
    except (RedisError, OSError, TimeoutError) as exc:
        # The guards live in Redis: without them, retry within the window rather than
        # leave the claimed attempt unsent until its deadline.
        return TransientProviderError("guards_unavailable", repr(exc)[:200], provider_fault=False)
    if wait > 0:
        return TransientProviderError(
            "rate_limited",
            f"{account.name} allows {account.rate_per_second}/s",
            retry_after=wait,
            provider_fault=False,
        )
    try:
        result = await plan.provider.send(plan.outbound)
    except TransientProviderError as exc:
        if exc.provider_fault and await _record(guards.record_provider_failure(account)):
            log.warning("circuit_opened", provider=account.name)
        return exc
    except (ProviderError, OSError, TimeoutError) as exc:
        # An adapter that failed in an unclassified way: treat as transient, retry in window.
        log.warning("provider_send_error", error=repr(exc))
        return TransientProviderError("provider_error", repr(exc)[:200])
    if admission.failures:
        # Failures were counted: this success resets them (none counted, nothing to reset:
        # a Redis round trip saved on nearly every send).
        await _record(guards.record_success(account))
    return result


async def _record(bookkeeping: Awaitable[T]) -> T | None:
    """Breaker bookkeeping after a send: a Redis outage must not lose what the provider said."""
    try:
        async with asyncio.timeout(GUARDS_TIMEOUT_SECONDS):
            return await bookkeeping
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("send_guards_unavailable", error=repr(exc))
        return None


async def step_deadline(ctx: dict[str, Any], message_id: str, step: int) -> None:
    rt = _runtime(ctx)
    uid = from_public("msg", message_id)
    if uid is None:
        return
    async with rt.transaction() as tx:
        await service.expire_step(tx, uid, step, utcnow())


async def expire_message(ctx: dict[str, Any], message_id: str) -> None:
    rt = _runtime(ctx)
    uid = from_public("msg", message_id)
    if uid is None:
        return
    async with rt.transaction() as tx:
        await service.expire_message(tx, uid, utcnow())


async def cancel_provider_send(
    ctx: dict[str, Any], provider: str, provider_message_id: str
) -> None:
    """Withdraw a send the cascade gave up on, where the provider's API can (best effort)."""
    rt = _runtime(ctx)
    try:
        adapter = rt.providers.for_callbacks(provider)
    except UnknownProvider:
        return
    if not isinstance(adapter, Cancellable):
        return  # the provider has no way to recall a send: nothing to do
    try:
        cancelled = await adapter.cancel(provider_message_id)
    except (ProviderError, OSError, TimeoutError) as exc:
        log.warning("provider_cancel_failed", provider=provider, error=repr(exc))
        return
    log.info("provider_cancel", provider=provider, cancelled=cancelled)


async def sweep(ctx: dict[str, Any]) -> None:
    rt = _runtime(ctx)
    async with rt.transaction() as tx:
        result = await service.sweep(tx, utcnow(), rt.settings.sweep_grace)
    if result.steps or result.deadlines or result.expired:
        log.info("swept", steps=result.steps, deadlines=result.deadlines, expired=result.expired)
