"""The fan-out loses nothing: the send path asks for a dispatch only when someone listens,
and the sweeper recovers dispatch and delivery jobs that never reached Redis."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from app.ids import IdPrefix, from_public
from app.messages.schemas import SendMessageRequest
from app.messages.service import accept_message
from app.queue import WEBHOOKS_QUEUE
from app.runtime import Runtime, utcnow
from app.webhooks import service as webhooks
from tests.conftest import Service, Tenant
from tests.helpers import message_body, send
from tests.webhooks.conftest import WebhookJobs, create_endpoint, deliveries
from tests.webhooks.receiver import Receiver

PUSH_ONLY = [{"channel": "push"}]


async def _accept(runtime: Runtime, tenant: Tenant, *, lose_jobs: bool) -> tuple[str, list[str]]:
    """Commit a message as the API does; returns its id and the jobs it asked for."""
    async with runtime.transaction() as tx:
        acceptance = await accept_message(
            tx,
            tenant.id,
            SendMessageRequest.model_validate(message_body(cascade=PUSH_ONLY)),
            None,
            runtime.providers,
            runtime.settings,
            utcnow(),
        )
        functions = [job.function for job in tx.jobs]
        if lose_jobs:
            tx.jobs.clear()  # a crash, or Redis away, between commit and enqueue
    return acceptance.message.id, functions


async def _sweep(runtime: Runtime, at: datetime) -> list[str]:
    """Run the webhook sweep as of `at`; returns the job ids it asked for (not enqueued:
    the test runs what it needs itself, on its own clock)."""
    async with runtime.transaction() as tx:
        await webhooks.sweep(tx, at, runtime.settings.sweep_grace)
        asked = [job.job_id for job in tx.jobs]
        tx.jobs.clear()
    return asked


async def test_the_send_path_asks_for_a_dispatch_only_when_the_tenant_has_endpoints(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    # The API process: it made the endpoint, so it sees it at once (others within
    # TENANT_CACHE_TTL_SECONDS, each process having its own cache on its Runtime).
    runtime = service.api_runtime
    _, without_endpoint = await _accept(runtime, tenant, lose_jobs=True)
    await create_endpoint(tenant.client, receiver.url())
    _, with_endpoint = await _accept(runtime, tenant, lose_jobs=True)

    assert "dispatch_webhooks" not in without_endpoint
    assert with_endpoint.count("dispatch_webhooks") == 1


async def test_events_whose_dispatch_job_was_lost_are_dispatched_by_the_sweeper(
    service: Service, tenant: Tenant, receiver: Receiver, webhook_jobs: WebhookJobs
) -> None:
    endpoint = await create_endpoint(
        tenant.client, receiver.url(), event_types=["message.accepted"]
    )
    receiver.secrets = [endpoint["secret"]]
    runtime = service.worker_runtime
    grace = runtime.settings.sweep_grace
    message_id, _ = await _accept(runtime, tenant, lose_jobs=True)

    # Within the grace period the event's own dispatch job may still be on its way.
    await _sweep(runtime, utcnow() + grace / 2)
    assert await deliveries(tenant.client, endpoint["id"]) == []

    later = utcnow() + grace * 2
    asked = await _sweep(runtime, later)
    [delivery] = await deliveries(tenant.client, endpoint["id"])
    assert delivery["message_id"] == message_id
    delivery_uuid = from_public(IdPrefix.WEBHOOK_DELIVERY, delivery["id"])
    assert delivery_uuid is not None
    assert f"wh:delivery:{delivery_uuid.hex}:0" in asked

    await webhook_jobs.deliver(delivery["id"], 0, later)
    [arrived] = await receiver.wait_for(1)
    assert arrived.verified
    assert (arrived.type, arrived.data["message_id"]) == ("message.accepted", message_id)
    # Swept again: nothing is dispatched twice.
    await _sweep(runtime, later)
    assert len(await deliveries(tenant.client, endpoint["id"])) == 1


async def test_a_delivery_whose_retry_job_was_lost_is_requeued_by_the_sweeper(
    service: Service, tenant: Tenant, webhook_jobs: WebhookJobs
) -> None:
    runtime = service.worker_runtime
    async with Receiver(start_now=False) as receiver:
        endpoint = await create_endpoint(
            tenant.client, receiver.url(), event_types=["message.accepted"]
        )
        await send(tenant.client, message_body(cascade=PUSH_ONLY))
        delivery = await _first_attempt_failed(tenant, endpoint["id"])
        delivery_uuid = from_public(IdPrefix.WEBHOOK_DELIVERY, delivery["id"])
        assert delivery_uuid is not None
        lost = f"wh:delivery:{delivery_uuid.hex}:1:retry"
        assert await runtime.redis.zrem(WEBHOOKS_QUEUE, lost) == 1
        await runtime.redis.delete(f"arq:job:{lost}")

        due = datetime.fromisoformat(delivery["next_retry_at"])
        assert f"wh:delivery:{delivery_uuid.hex}:1" not in await _sweep(runtime, due)
        past_grace = due + runtime.settings.sweep_grace + timedelta(seconds=1)
        assert f"wh:delivery:{delivery_uuid.hex}:1" in await _sweep(runtime, past_grace)

        await receiver.start()
        await webhook_jobs.deliver(delivery["id"], 1, past_grace)
        assert len(await receiver.wait_for(1)) == 1
        [done] = await deliveries(tenant.client, endpoint["id"])
        assert (done["status"], done["attempts"]) == ("succeeded", 2)


async def _first_attempt_failed(tenant: Tenant, endpoint_id: str) -> dict[str, Any]:
    for _ in range(500):
        found = await deliveries(tenant.client, endpoint_id)
        if found and found[0]["error"] is not None:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError("the first attempt was never made")
