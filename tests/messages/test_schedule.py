"""Scheduling, expiry and cancellation, and never the same message on two channels."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import httpx
import httpx2
import orjson
import pytest
from sqlalchemy import update

from app.cascade.engine import DeliveryEngine
from app.ids import IdPrefix, from_public
from app.ledger.tables import messages
from app.runtime import utcnow
from providers.base import Cancellable, TransientProviderError
from providers.sandbox import SandboxProvider, sign
from providers.twilio import TwilioConfig, TwilioProvider
from tests.conftest import Service, Tenant
from tests.helpers import (
    attempt_statuses,
    due_at,
    eventually,
    message_body,
    send,
    wait_until_final,
)


def sandbox(service_: Service) -> SandboxProvider:
    provider = service_.worker_runtime.providers.for_callbacks("sandbox")
    assert isinstance(provider, SandboxProvider)
    return provider


async def late_receipt(service_: Service, attempt_id: str) -> None:
    receipt = orjson.dumps(
        {"event_id": f"late-{attempt_id}", "attempt_id": attempt_id, "status": "delivered"}
    )
    secret = service_.settings.sandbox_secret.get_secret_value()
    async with httpx.AsyncClient(base_url=service_.base_url) as provider:
        answer = await provider.post(
            "/v1/providers/sandbox/status",
            content=receipt,
            headers={"x-sandbox-signature": sign(secret, receipt, int(time.time()))},
        )
    assert answer.json() == {"received": 1, "applied": 1}


async def scheduled(tenant: Tenant, ahead: timedelta, **overrides: Any) -> dict[str, Any]:
    body = message_body(send_at=(utcnow() + ahead).isoformat(), **overrides)
    response = await tenant.client.post("/v1/messages", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


async def test_a_scheduled_message_waits_queued_and_is_not_sent_early(
    service: Service, tenant: Tenant
) -> None:
    accepted = await scheduled(tenant, timedelta(hours=1))
    message_id = accepted["id"]
    message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()

    # An engine's claim now (another worker, a restart) leaves it alone.
    engine = DeliveryEngine(service.worker_runtime, "transactional")
    await engine.claim(1000)
    await engine.drain()
    untouched = (await tenant.client.get(f"/v1/messages/{message_id}")).json()

    assert accepted["status"] == "queued"
    assert message["status"] == "queued"
    assert message["send_at"] is not None
    due = await due_at(service.worker_runtime, message_id)
    assert due is not None
    assert abs(due.timestamp() - time.time() - 3600) < 60  # due in about an hour
    assert untouched["attempts"] == []
    assert untouched["status"] == "queued"


async def test_a_scheduled_message_is_sent_at_its_time(tenant: Tenant) -> None:
    accepted = await scheduled(tenant, timedelta(seconds=1))

    message = await wait_until_final(tenant.client, accepted["id"])

    assert message["status"] == "delivered"
    sending = next(e for e in message["events"] if e["status"] == "sending")
    assert sending["at"] >= message["send_at"]


async def test_a_message_not_delivered_by_expires_at_ends_expired_on_any_step(
    service: Service, tenant: Tenant
) -> None:
    body = message_body(
        to={"push_token": "tok-reject", "phone": "+48600100203"},
        cascade=[{"channel": "push"}, {"channel": "sms", "timeout": 600}],
        expires_at=(utcnow() + timedelta(seconds=1)).isoformat(),
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "expired"
    assert attempt_statuses(message) == [("push", "rejected"), ("sms", "expired")]
    assert message["events"][-1]["source"] == "timeout"
    assert message["events"][-1]["detail"]["code"] == "expired"
    # The SMS still waiting at the provider is withdrawn where the provider can.
    sms = message["attempts"][1]["provider_message_id"]
    await eventually(lambda: sms in sandbox(service).cancelled)
    # A delivery reported after the deadline is recorded, and the message stays expired.
    await late_receipt(service, message["attempts"][1]["id"])
    after = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    assert after["status"] == "expired"
    assert after["attempts"][1]["status"] == "delivered"


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"expires_at": "2020-01-01T00:00:00Z"}, "body.expires_at"),
        (
            {"send_at": "2099-01-02T00:00:00Z", "expires_at": "2099-01-01T00:00:00Z"},
            "body",
        ),
        ({"send_at": "2099-01-01T00:00:00"}, "body.send_at"),  # no offset: ambiguous
    ],
)
async def test_impossible_schedules_are_refused(
    tenant: Tenant, fields: dict[str, str], path: str
) -> None:
    response = await tenant.client.post("/v1/messages", json=message_body(**fields))

    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == path


async def test_a_message_is_cancelled_before_delivery_and_not_after(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    accepted = await scheduled(tenant, timedelta(hours=1))
    url = f"/v1/messages/{accepted['id']}/cancel"

    theirs = await other_tenant.client.post(url)
    cancelled = await tenant.client.post(url)
    again = await tenant.client.post(url)
    delivered = await wait_until_final(tenant.client, await send(tenant.client, message_body()))
    too_late = await tenant.client.post(f"/v1/messages/{delivered['id']}/cancel")

    assert theirs.status_code == 404
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["events"][-1]["status"] == "cancelled"
    assert cancelled.json()["events"][-1]["source"] == "api"
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert too_late.status_code == 409
    assert "delivered" in too_late.json()["detail"]


async def test_cancelling_a_sent_message_withdraws_it_and_a_late_receipt_changes_nothing(
    service: Service, tenant: Tenant
) -> None:
    body = message_body(to={"phone": "+48600100203"}, cascade=[{"channel": "sms"}])
    message_id = await send(tenant.client, body)
    for _ in range(200):
        message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
        if message["attempts"] and message["attempts"][0]["status"] == "sent":
            break
        await asyncio.sleep(0.02)
    attempt = message["attempts"][0]
    cancelled = await tenant.client.post(f"/v1/messages/{message_id}/cancel")
    await eventually(lambda: attempt["provider_message_id"] in sandbox(service).cancelled)
    await late_receipt(service, attempt["id"])
    final = (await tenant.client.get(f"/v1/messages/{message_id}")).json()

    assert cancelled.json()["status"] == "cancelled"
    assert final["status"] == "cancelled"
    assert final["attempts"][0]["status"] == "delivered"  # recorded, never revives it


async def test_once_a_step_is_delivered_later_steps_are_never_sent(
    service: Service, tenant: Tenant
) -> None:
    message = await wait_until_final(tenant.client, await send(tenant.client, message_body()))

    # Due again by mistake (a restart's migration, a stray write): the engine sends nothing.
    async with service.worker_runtime.engine.begin() as conn:
        await conn.execute(
            update(messages)
            .where(messages.c.id == from_public(IdPrefix.MESSAGE, message["id"]))
            .values(due_at=utcnow())
        )
    engine = DeliveryEngine(service.worker_runtime, "transactional")
    await engine.claim(1000)
    await engine.drain()
    after = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()

    assert message["delivered_channel"] == "push"
    assert attempt_statuses(after) == [("push", "delivered")]
    assert after["events"] == message["events"]


async def test_a_step_given_up_on_is_withdrawn_at_the_provider(
    service: Service, tenant: Tenant
) -> None:
    body = message_body(
        to={"push_token": "device-silent", "phone": "+48600100200"},
        cascade=[{"channel": "push", "timeout": 1}, {"channel": "sms"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))
    push = message["attempts"][0]["provider_message_id"]

    assert attempt_statuses(message) == [("push", "expired"), ("sms", "delivered")]
    await eventually(lambda: push in sandbox(service).cancelled)


def _twilio(handler: Any) -> TwilioProvider:
    config = TwilioConfig(
        account_sid="AC" + "1" * 32, auth_token="t0ken", from_number="+15005550006"
    )
    return TwilioProvider(config, http=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))


async def test_twilio_cancel_speaks_twilios_api() -> None:
    seen: list[httpx2.Request] = []

    def twilio(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        sid = request.url.path.rsplit("/", 1)[1].removesuffix(".json")
        if sid == "SMscheduled":
            return httpx2.Response(200, json={"sid": sid, "status": "canceled"})
        if sid == "SMbusy":
            return httpx2.Response(503, json={"code": 20503, "message": "unavailable"})
        return httpx2.Response(
            400, json={"code": 30409, "message": "not cancellable", "status": 400}
        )

    provider = _twilio(twilio)
    try:
        withdrawn = await provider.cancel("SMscheduled")
        already_sent = await provider.cancel("SMdelivered")
        with pytest.raises(TransientProviderError):
            await provider.cancel("SMbusy")
    finally:
        await provider.aclose()

    assert (withdrawn, already_sent) == (True, False)
    first = seen[0]
    assert first.method == "POST"
    assert first.url.path == f"/2010-04-01/Accounts/AC{'1' * 32}/Messages/SMscheduled.json"
    assert first.content == b"Status=canceled"
    assert first.headers["authorization"].startswith("Basic ")


def test_only_providers_with_a_recall_api_are_cancellable(service: Service) -> None:
    registry = service.worker_runtime.providers
    cancellable = sorted({r.account.type for r in registry if isinstance(r.provider, Cancellable)})
    # WhatsApp, FCM, Web Push, SMTP: no API to recall a send.
    assert cancellable == ["sandbox", "smpp", "twilio"]
