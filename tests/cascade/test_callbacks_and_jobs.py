"""Provider callbacks, concurrent claims, lost wake-ups and dead workers: nothing lost,
nothing sent twice."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import update

from app.cascade.engine import DeliveryEngine
from app.cascade.machine import MessageStatus
from app.ids import IdPrefix, from_public
from app.ledger.tables import messages
from app.runtime import utcnow
from providers.base import Category, Channel
from providers.sandbox import SandboxProvider, sign
from tests.conftest import Service, Tenant
from tests.helpers import (
    accept_without_wake,
    due_at,
    message_body,
    send,
    wait_until_final,
)
from tests.ops.test_stats import stats


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


async def test_concurrent_claims_send_a_step_once(service: Service, tenant: Tenant) -> None:
    """Five engines (as five worker processes would) claim at once: the step is taken by
    one of them, sent once, and never claimed again while it waits for its receipt."""
    body = message_body(to={"phone": "+48600100203"}, cascade=[{"channel": "sms"}])
    message_id = await accept_without_wake(service.worker_runtime, tenant.id, body)
    engines = [DeliveryEngine(service.worker_runtime, "transactional") for _ in range(5)]

    await asyncio.gather(*(engine.claim(10) for engine in engines))
    await asyncio.gather(*(engine.drain() for engine in engines))
    await asyncio.gather(*(engine.claim(10) for engine in engines))
    await asyncio.gather(*(engine.drain() for engine in engines))

    message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    assert len(message["attempts"]) == 1
    assert message["attempts"][0]["tries"] == 1
    assert _sandbox(service).submissions[message["attempts"][0]["id"]] == 1
    assert [e["status"] for e in message["events"]] == ["accepted", "sending", "sent"]


async def test_a_message_whose_wake_up_was_lost_is_still_delivered(
    service: Service, tenant: Tenant
) -> None:
    message_id = await accept_without_wake(service.worker_runtime, tenant.id, message_body())

    message = await wait_until_final(tenant.client, message_id)

    assert message["status"] == MessageStatus.DELIVERED


async def test_a_claimed_step_whose_worker_died_is_never_resent_its_deadline_decides(
    service: Service, tenant: Tenant
) -> None:
    """Killed between the claim's commit and the request: the step stays `sending`, is
    not sent again, and falls over when its window closes."""
    body = message_body(
        to={"phone": "+48600100200", "email": "ann@example.com"},
        cascade=[{"channel": "sms", "timeout": 1}, {"channel": "email"}],
    )
    message_id = await accept_without_wake(service.worker_runtime, tenant.id, body)
    doomed = DeliveryEngine(service.worker_runtime, "transactional")
    await doomed.claim(100)
    for task in list(doomed._tasks):
        task.cancel()  # the process is gone before any send left
    await doomed.drain()

    message = await wait_until_final(tenant.client, message_id)

    sms, email = message["attempts"]
    assert (sms["status"], sms["error"]["code"], sms["tries"]) == ("expired", "timeout", 1)
    assert _sandbox(service).submissions.get(sms["id"], 0) == 0
    assert email["status"] in ("sent", "delivered")
    assert message["status"] == "delivered"


async def test_a_silent_step_times_out_from_its_due_at_with_nothing_in_redis(
    service: Service, tenant: Tenant
) -> None:
    message = await _silent_sms(tenant, step_timeout=1)
    redis_keys = [key async for key in service.worker_runtime.redis.scan_iter(f"*{message['id']}*")]

    final = await wait_until_final(tenant.client, message["id"])

    assert redis_keys == []
    assert final["status"] == "failed"
    assert final["attempts"][0]["status"] == "expired"


async def test_a_final_message_leaves_the_engines_index(service: Service, tenant: Tenant) -> None:
    waiting = await _silent_sms(tenant)
    delivered = await send(
        tenant.client, message_body(to={"phone": "+48600100200"}, cascade=[{"channel": "sms"}])
    )
    assert (await wait_until_final(tenant.client, delivered))["status"] == "delivered"

    assert await due_at(service.worker_runtime, delivered) is None
    assert await due_at(service.worker_runtime, waiting["id"]) is not None
    cancelled = await tenant.client.post(f"/v1/messages/{waiting['id']}/cancel")
    assert cancelled.status_code == 200
    assert await due_at(service.worker_runtime, waiting["id"]) is None


async def test_a_final_message_found_due_is_forgotten_not_retimed_to_its_expiry(
    service: Service, tenant: Tenant
) -> None:
    body = message_body(
        to={"phone": "+48600100200"},
        cascade=[{"channel": "sms"}],
        expires_at=(utcnow() + timedelta(hours=1)).isoformat(),
    )
    message_id = await send(tenant.client, body)
    assert (await wait_until_final(tenant.client, message_id))["status"] == "delivered"
    async with service.worker_runtime.engine.begin() as conn:
        await conn.execute(
            update(messages)
            .where(messages.c.id == from_public(IdPrefix.MESSAGE, message_id))
            .values(due_at=utcnow())
        )

    engine = DeliveryEngine(service.worker_runtime, "transactional")
    await engine.claim(1000)

    assert await due_at(service.worker_runtime, message_id) is None


async def _wait_for_sent(tenant: Tenant, message_id: str, step: int) -> dict[str, Any]:
    for _ in range(300):
        message: dict[str, Any] = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
        if any(a["step"] == step and a["status"] == "sent" for a in message["attempts"]):
            return message
        await asyncio.sleep(0.02)
    raise AssertionError(f"step {step} was never sent")


async def test_a_late_delivery_revives_a_failed_message_and_it_counts_once(
    service: Service, tenant: Tenant
) -> None:
    message = await _silent_sms(tenant)
    attempt_id = message["attempts"][0]["id"]

    await _receipt(service, {"event_id": "f", "attempt_id": attempt_id, "status": "failed"})
    failed = await stats(tenant, bucket="minute")
    await _receipt(service, {"event_id": "d", "attempt_id": attempt_id, "status": "delivered"})
    revived = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    counted = await stats(tenant, bucket="minute")

    assert (failed["messages"], failed["by_status"]) == (1, {"failed": 1})
    assert (revived["status"], revived["delivered_channel"]) == ("delivered", "sms")
    # One message, in its latest final status: the failure is taken back.
    assert (counted["messages"], counted["by_status"]) == (1, {"delivered": 1})
    assert [(c["status"], c["messages"]) for c in counted["counts"] if c["messages"]] == [
        ("delivered", 1)
    ]
    assert counted["time_to_deliver"]["delivered"] == 1
    for bucket in ("hour", "day"):
        assert (await stats(tenant, bucket=bucket))["by_status"] == {"delivered": 1}


async def test_contradictory_receipts_leave_both_deliveries_in_the_ledger_counted_once(
    service: Service, tenant: Tenant
) -> None:
    body = message_body(
        to={"phone": "+48600100203", "push_token": "device-silent"},
        cascade=[{"channel": "sms", "timeout": 120}, {"channel": "push", "timeout": 120}],
    )
    message_id = await send(tenant.client, body)
    sms = (await _wait_for_sent(tenant, message_id, 0))["attempts"][0]["id"]

    # The SMS is reported failed: the push fallback is sent...
    await _receipt(service, {"event_id": "x1", "attempt_id": sms, "status": "failed"})
    push = (await _wait_for_sent(tenant, message_id, 1))["attempts"][1]["id"]
    # ... then the SMS turns out delivered after all, and so does the push.
    await _receipt(service, {"event_id": "x2", "attempt_id": sms, "status": "delivered"})
    await _receipt(service, {"event_id": "x3", "attempt_id": push, "status": "delivered"})

    message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    assert (message["status"], message["delivered_channel"], message["delivered_step"]) == (
        "delivered",
        "sms",
        0,
    )
    assert [a["status"] for a in message["attempts"]] == ["delivered", "delivered"]
    again = [e for e in message["events"] if e["status"] == "delivered_again"]
    assert [(e["attempt"], e["detail"]["code"]) for e in again] == [(None, "duplicate_delivery")]
    assert [e["status"] for e in message["events"] if e["attempt"] is None] == [
        "accepted",
        "delivered",
        "delivered_again",
    ]
    counted = await stats(tenant, bucket="minute")
    assert (counted["messages"], counted["by_status"]) == (1, {"delivered": 1})
