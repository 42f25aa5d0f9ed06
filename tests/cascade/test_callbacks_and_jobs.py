"""Provider callbacks, job reruns and the sweeper: nothing lost, nothing sent twice."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import orjson
from arq.constants import job_key_prefix

from app.cascade import jobs
from app.cascade import service as cascade
from app.cascade.machine import MessageStatus
from app.ids import to_public
from app.messages.schemas import SendMessageRequest
from app.messages.service import accept_message
from app.queue import Job, queue_name, withdrawn
from app.runtime import utcnow
from providers.base import Category, Channel
from providers.sandbox import SandboxProvider, sign
from tests.conftest import Service, Tenant
from tests.helpers import message_body, send, wait_until_final


def _sandbox(service_: Service) -> SandboxProvider:
    provider = service_.worker_runtime.providers.get(Channel.SMS, "sandbox", Category.TRANSACTIONAL)
    assert isinstance(provider, SandboxProvider)
    return provider


async def _receipt(
    service_: Service, payload: dict[str, Any], secret: str | None = None
) -> httpx.Response:
    body = orjson.dumps(payload)
    secret = secret or service_.settings.sandbox_secret.get_secret_value()
    async with httpx.AsyncClient(base_url=service_.base_url) as client:
        return await client.post(
            "/v1/providers/sandbox/status",
            content=body,
            headers={"x-sandbox-signature": sign(secret, body, int(time.time()))},
        )


async def _silent_sms(tenant: Tenant, step_timeout: int = 120) -> dict[str, Any]:
    """A message whose SMS was accepted and is waiting for a receipt that won't come."""
    body = message_body(
        to={"phone": "+48600100203"}, cascade=[{"channel": "sms", "timeout": step_timeout}]
    )
    message_id = await send(tenant.client, body)
    for _ in range(200):
        message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
        if message["attempts"] and message["attempts"][0]["status"] == "sent":
            return dict(message)
        await asyncio.sleep(0.02)
    raise AssertionError("the SMS was never sent")


async def test_forged_sandbox_callback_is_refused_and_changes_nothing(
    service: Service, tenant: Tenant
) -> None:
    message = await _silent_sms(tenant)
    attempt = message["attempts"][0]
    payload = {"event_id": "forged-1", "attempt_id": attempt["id"], "status": "delivered"}

    response = await _receipt(service, payload, secret="not-the-secret")

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    after = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    assert after["status"] == "sending"
    assert after["events"] == message["events"]


async def test_unsigned_and_malformed_callbacks_are_refused(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        unsigned = await client.post("/v1/providers/sandbox/status", content=b"{}")
        unknown = await client.post("/v1/providers/nope/status", content=b"{}")
    malformed = await _receipt(service, {"no": "status"})

    assert unsigned.status_code == 401
    assert unknown.status_code == 404
    assert malformed.status_code == 400


async def test_the_same_callback_twice_changes_nothing(service: Service, tenant: Tenant) -> None:
    message = await _silent_sms(tenant)
    payload = {
        "event_id": "dlr-77",
        "attempt_id": message["attempts"][0]["id"],
        "status": "delivered",
    }

    first = await _receipt(service, payload)
    delivered = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    second = await _receipt(service, payload)
    again = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()

    assert first.json() == {"received": 1, "applied": 1}
    assert second.json() == {"received": 1, "applied": 0}
    assert delivered["status"] == "delivered"
    assert again == delivered


async def test_failure_after_delivery_does_not_undo_it(service: Service, tenant: Tenant) -> None:
    message = await _silent_sms(tenant)
    attempt_id = message["attempts"][0]["id"]

    await _receipt(service, {"event_id": "a", "attempt_id": attempt_id, "status": "delivered"})
    await _receipt(service, {"event_id": "b", "attempt_id": attempt_id, "status": "failed"})
    await _receipt(service, {"event_id": "c", "attempt_id": attempt_id, "status": "sent"})

    final = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    assert final["status"] == "delivered"
    assert final["attempts"][0]["status"] == "delivered"


async def _accepted_but_never_enqueued(
    service_: Service, tenant: Tenant, body: dict[str, Any]
) -> str:
    """Commit a message the way the API does, then lose its job (a crash before enqueue)."""
    runtime = service_.worker_runtime
    async with runtime.transaction() as tx:
        acceptance = await accept_message(
            tx,
            tenant.id,
            SendMessageRequest.model_validate(body),
            None,
            runtime.providers,
            runtime.settings,
            utcnow(),
        )
        tx.jobs.clear()
    return acceptance.message.id


async def test_a_step_job_run_twice_sends_once(service: Service, tenant: Tenant) -> None:
    body = message_body(to={"phone": "+48600100203"}, cascade=[{"channel": "sms"}])
    message_id = await _accepted_but_never_enqueued(service, tenant, body)
    ctx = {"runtime": service.worker_runtime}

    await asyncio.gather(*(jobs.send_step(ctx, message_id, 0) for _ in range(5)))
    await jobs.send_step(ctx, message_id, 0)

    message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    assert len(message["attempts"]) == 1
    assert message["attempts"][0]["tries"] == 1
    assert _sandbox(service).submissions[message["attempts"][0]["id"]] == 1
    assert [e["status"] for e in message["events"]] == ["accepted", "sending", "sent"]


def _jobs_for(tx: Any, message_id: str) -> list[str]:
    return [job.job_id for job in tx.jobs if message_id in job.job_id]


async def test_sweeper_picks_up_a_message_committed_but_never_enqueued(
    service: Service, tenant: Tenant
) -> None:
    message_id = await _accepted_but_never_enqueued(service, tenant, message_body())
    runtime = service.worker_runtime
    grace = runtime.settings.sweep_grace

    async with runtime.transaction() as tx:
        await cascade.sweep(tx, utcnow() + grace / 2, grace)
        within_grace = _jobs_for(tx, message_id)
        tx.jobs.clear()
    async with runtime.transaction() as tx:
        # Time injected: the sweeper runs as if the grace period had passed.
        await cascade.sweep(tx, utcnow() + grace * 2, grace)
        after_grace = _jobs_for(tx, message_id)
        tx.jobs[:] = [job for job in tx.jobs if job.job_id in after_grace]

    assert within_grace == []
    assert after_grace == [f"msg:{message_id}:step:0"]
    message = await wait_until_final(tenant.client, message_id)
    assert message["status"] == MessageStatus.DELIVERED


async def test_sweeper_expires_a_step_whose_deadline_job_was_lost(
    service: Service, tenant: Tenant
) -> None:
    message = await _silent_sms(tenant, step_timeout=1)
    runtime = service.worker_runtime
    lost_job = f"msg:{message['id']}:deadline:0"
    await runtime.redis.zrem("cascade:transactional", lost_job)
    await runtime.redis.delete(f"arq:job:{lost_job}")
    await asyncio.sleep(1.2)  # past the one-second step deadline

    async with runtime.transaction() as tx:
        await cascade.sweep(tx, utcnow(), runtime.settings.sweep_grace)
        swept = _jobs_for(tx, message["id"])
        tx.jobs[:] = [job for job in tx.jobs if job.job_id in swept]

    assert swept == [lost_job]
    final = await wait_until_final(tenant.client, message["id"])
    assert final["status"] == "failed"
    assert final["attempts"][0]["status"] == "expired"


def test_public_ids_are_prefixed() -> None:
    import uuid

    assert to_public("msg", uuid.UUID(int=1)).startswith("msg_")


async def test_a_step_that_ends_takes_its_deadline_job_off_the_queue(
    service: Service, tenant: Tenant
) -> None:
    """Delivered before its timeout: no deadline check is left to run a step's timeout
    later; a silent step keeps its own."""
    delivered = await send(
        tenant.client, message_body(to={"phone": "+48600100200"}, cascade=[{"channel": "sms"}])
    )
    silent = await _silent_sms(tenant)
    assert (await wait_until_final(tenant.client, delivered))["status"] == "delivered"
    redis = service.worker_runtime.redis
    queued = {
        member.decode() for member in await redis.zrange(queue_name(Category.TRANSACTIONAL), 0, -1)
    }

    assert f"msg:{delivered}:deadline:0" not in queued
    assert not await redis.exists(f"{job_key_prefix}msg:{delivered}:deadline:0")
    assert f"msg:{silent['id']}:deadline:0" in queued


async def test_withdrawing_removes_a_queued_job_and_nothing_else(service: Service) -> None:
    runtime = service.worker_runtime
    name = f"test:withdraw:{uuid.uuid4().hex}"
    waiting = Job(
        "f", Category.TRANSACTIONAL, uuid.uuid4().hex, defer=timedelta(hours=1), queue=name
    )
    running = Job("f", Category.TRANSACTIONAL, uuid.uuid4().hex, queue=name)
    await runtime.queue.enqueue_many([waiting])
    # Picked by a worker already: off the queue, its key still there until it finishes.
    await runtime.redis.set(f"{job_key_prefix}{running.job_id}", b"payload")
    try:
        await runtime.queue.enqueue_many([withdrawn(waiting), withdrawn(running)])
        queued = await runtime.redis.zrange(name, 0, -1)
        keys = [
            await runtime.redis.exists(f"{job_key_prefix}{job.job_id}")
            for job in (waiting, running)
        ]
        # Withdrawn, it may be added again (a deterministic id is not burnt).
        again = await runtime.queue.enqueue_many([waiting])
    finally:
        await runtime.redis.delete(
            name, *(f"{job_key_prefix}{job.job_id}" for job in (waiting, running))
        )

    assert queued == []
    assert keys == [0, 1]
    assert again == 1
