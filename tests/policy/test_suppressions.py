"""Suppressions through the API: marketing skips suppressed addresses, hard bounces and
complaints stop every category, and one-click unsubscribe and STOP replies add them."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import orjson
from twilio.request_validator import RequestValidator

from app.policy.service import suppress
from providers.base import Channel
from providers.sandbox import sign
from tests.conftest import Service, Simulators, Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final


def marketing(**overrides: Any) -> dict[str, Any]:
    return message_body(category="marketing", **overrides)


async def suppress_via_api(
    tenant: Tenant, channel: str, address: str, reason: str = "manual"
) -> httpx.Response:
    response = await tenant.client.post(
        "/v1/suppressions", json={"channel": channel, "address": address, "reason": reason}
    )
    assert response.status_code == 201, response.text
    return response


async def test_suppressions_are_normalised_listed_and_lifted(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    added = await suppress_via_api(tenant, "email", " Ann@Example.COM ", "complaint")
    await suppress_via_api(tenant, "sms", "+48 600 100 200")

    listed = (await tenant.client.get("/v1/suppressions")).json()
    found = (
        await tenant.client.get(
            "/v1/suppressions", params={"channel": "email", "address": "ANN@example.com"}
        )
    ).json()
    theirs = (await other_tenant.client.get("/v1/suppressions")).json()
    lifted = await tenant.client.delete(
        "/v1/suppressions", params={"channel": "sms", "address": "+48600100200"}
    )
    again = await tenant.client.delete(
        "/v1/suppressions", params={"channel": "sms", "address": "+48600100200"}
    )

    assert added.json()["address"] == "ann@example.com"
    assert added.json()["applies_to"] == "all"
    assert [(s["channel"], s["address"], s["reason"]) for s in listed["data"]] == [
        ("email", "ann@example.com", "complaint"),
        ("sms", "+48600100200", "manual"),
    ]
    assert listed["data"][1]["applies_to"] == "marketing"
    assert [s["address"] for s in found["data"]] == ["ann@example.com"]
    assert theirs["data"] == []
    assert lifted.status_code == 204
    assert again.status_code == 404


async def test_an_invalid_address_is_refused(tenant: Tenant) -> None:
    response = await tenant.client.post(
        "/v1/suppressions", json={"channel": "sms", "address": "not a phone"}
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "body.address"


async def test_a_suppressed_marketing_step_is_skipped_and_the_cascade_moves_on(
    tenant: Tenant,
) -> None:
    await suppress_via_api(tenant, "push", "device-ok", "unsubscribed")

    message = await wait_until_final(tenant.client, await send(tenant.client, marketing()))

    assert message["status"] == "delivered"
    assert attempt_statuses(message) == [("push", "suppressed"), ("sms", "delivered")]
    assert message["attempts"][0]["error"]["code"] == "suppressed"
    assert message["attempts"][0]["provider_message_id"] is None


async def test_a_marketing_message_with_no_reachable_step_ends_suppressed(
    tenant: Tenant,
) -> None:
    body = marketing(
        to={"phone": "+48600100210", "email": "gone@example.com"},
        cascade=[{"channel": "sms"}, {"channel": "email"}],
    )
    await suppress_via_api(tenant, "sms", "+48600100210", "unsubscribed")
    await suppress_via_api(tenant, "email", "gone@example.com", "manual")

    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "suppressed"
    assert attempt_statuses(message) == [("sms", "suppressed"), ("email", "suppressed")]
    assert message["events"][-1]["status"] == "suppressed"


async def test_unsubscribes_do_not_stop_transactional_messages(tenant: Tenant) -> None:
    await suppress_via_api(tenant, "push", "device-ok", "unsubscribed")

    message = await wait_until_final(tenant.client, await send(tenant.client, message_body()))

    assert attempt_statuses(message) == [("push", "delivered")]


async def test_a_hard_bounce_suppresses_every_category(service: Service, tenant: Tenant) -> None:
    # What provider bounce handling does: one call inside its transaction.
    async with service.api_runtime.transaction() as tx:
        await suppress(tx, tenant.id, Channel.EMAIL, "Bounced@Example.com", "hard_bounce")
    body = message_body(
        to={"email": "bounced@example.com", "phone": "+48600100200"},
        cascade=[{"channel": "email"}, {"channel": "sms"}],
    )

    transactional = await wait_until_final(tenant.client, await send(tenant.client, body))
    service_ = await wait_until_final(
        tenant.client, await send(tenant.client, {**body, "category": "service"})
    )

    for message in (transactional, service_):
        assert attempt_statuses(message) == [("email", "suppressed"), ("sms", "delivered")]
        assert "hard_bounce" in message["attempts"][0]["error"]["detail"]


async def test_a_complaint_widens_an_earlier_unsubscribe(service: Service, tenant: Tenant) -> None:
    await suppress_via_api(tenant, "email", "ann@example.com", "unsubscribed")
    async with service.api_runtime.transaction() as tx:
        widened = await suppress(tx, tenant.id, Channel.EMAIL, "ann@example.com", "complaint")
    async with service.api_runtime.transaction() as tx:
        narrowed = await suppress(tx, tenant.id, Channel.EMAIL, "ann@example.com", "manual")

    found = (
        await tenant.client.get(
            "/v1/suppressions", params={"channel": "email", "address": "ann@example.com"}
        )
    ).json()["data"]
    assert (widened, narrowed) == (True, False)
    assert found[0]["reason"] == "complaint"


async def test_marketing_email_carries_a_one_click_unsubscribe_that_works(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    address = f"news-{uuid.uuid4().hex[:8]}@example.com"
    body = marketing(
        to={"email": address}, cascade=[{"channel": "email", "provider": "smtp", "timeout": 3}]
    )
    await wait_until_final(tenant.client, await send(tenant.client, body))
    mail = next(m for m in simulators.smtp.messages if address in m.rcpt_tos)
    link = str(mail.message["List-Unsubscribe"]).strip("<>")

    async with httpx.AsyncClient() as anonymous:
        # What a mailbox provider sends for RFC 8058 one-click: a form POST, no credentials.
        clicked = await anonymous.post(link, data={"List-Unsubscribe": "One-Click"})
        forged = await anonymous.post(link[:-4] + "AAAA")
    again = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert link.startswith(f"{service.base_url}/v1/unsubscribe/")
    assert clicked.status_code == 200
    assert forged.status_code == 404
    assert again["status"] == "suppressed"
    found = (
        await tenant.client.get("/v1/suppressions", params={"channel": "email", "address": address})
    ).json()["data"]
    assert (found[0]["reason"], found[0]["source"]) == ("unsubscribed", "unsubscribe")


async def test_transactional_email_has_no_unsubscribe_header(
    tenant: Tenant, simulators: Simulators
) -> None:
    address = f"otp-{uuid.uuid4().hex[:8]}@example.com"
    body = message_body(
        to={"email": address}, cascade=[{"channel": "email", "provider": "smtp", "timeout": 3}]
    )
    await wait_until_final(tenant.client, await send(tenant.client, body))
    mail = next(m for m in simulators.smtp.messages if address in m.rcpt_tos)

    assert mail.message["List-Unsubscribe"] is None


async def _inbound(service_: Service, payload: dict[str, Any], secret: str | None = None) -> Any:
    body = orjson.dumps(payload)
    secret = secret or service_.settings.sandbox_secret.get_secret_value()
    async with httpx.AsyncClient(base_url=service_.base_url) as client:
        return await client.post(
            "/v1/providers/sandbox/inbound",
            content=body,
            headers={"x-sandbox-signature": sign(secret, body, int(time.time()))},
        )


async def test_a_stop_reply_suppresses_marketing_sms_and_start_lifts_it(
    service: Service, tenant: Tenant, other_tenant: Tenant
) -> None:
    phone = "+48602" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"
    body = marketing(to={"phone": phone}, cascade=[{"channel": "sms"}])
    await wait_until_final(tenant.client, await send(tenant.client, body))

    stop = await _inbound(
        service,
        {"event_id": f"in-{phone}-1", "channel": "sms", "from": phone, "text": " stop "},
    )
    stopped = await wait_until_final(tenant.client, await send(tenant.client, body))
    transactional = await wait_until_final(
        tenant.client, await send(tenant.client, {**body, "category": "transactional"})
    )
    theirs = await wait_until_final(other_tenant.client, await send(other_tenant.client, body))
    start = await _inbound(
        service, {"event_id": f"in-{phone}-2", "channel": "sms", "from": phone, "text": "START"}
    )
    resumed = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert stop.json() == {"received": 1, "applied": 1}
    assert stopped["status"] == "suppressed"
    assert transactional["status"] == "delivered"
    # Only the tenant whose marketing the reply answered is affected.
    assert theirs["status"] == "delivered"
    assert start.json() == {"received": 1, "applied": 1}
    assert resumed["status"] == "delivered"


async def test_inbound_messages_must_be_signed(service: Service) -> None:
    payload = {"event_id": "x", "channel": "sms", "from": "+48600100200", "text": "STOP"}
    forged = await _inbound(service, payload, secret="not-the-secret")
    chatter = await _inbound(service, {**payload, "text": "stop by tomorrow?"})

    assert forged.status_code == 401
    assert chatter.json() == {"received": 1, "applied": 0}


async def test_a_stop_reply_through_twilios_incoming_webhook_suppresses(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    phone = "+48603" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"
    body = marketing(to={"phone": phone}, cascade=[{"channel": "sms", "provider": "twilio"}])
    await wait_until_final(tenant.client, await send(tenant.client, body))
    url = f"{service.base_url}/v1/providers/twilio/inbound"
    form = {
        "MessageSid": f"SM{uuid.uuid4().hex}",
        "AccountSid": simulators.twilio.account_sid,
        "From": phone,
        "To": "+15005550006",
        "Body": "Stop",
    }
    signature = RequestValidator(simulators.twilio.auth_token).compute_signature(url, form)

    async with httpx.AsyncClient() as twilio:
        forged = await twilio.post(url, data=form, headers={"X-Twilio-Signature": "bm9wZQ=="})
        stop = await twilio.post(url, data=form, headers={"X-Twilio-Signature": signature})
    after = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert forged.status_code == 401
    assert stop.json() == {"received": 1, "applied": 1}
    assert after["status"] == "suppressed"


async def _marketing_status(tenant: Tenant, phone: str) -> str:
    """What a marketing SMS to `phone` ends as now: `delivered` or `suppressed`."""
    body = marketing(to={"phone": phone}, cascade=[{"channel": "sms"}])
    return str((await wait_until_final(tenant.client, await send(tenant.client, body)))["status"])


def _reply(phone: str, event_id: str, text: str, at: str | None = None) -> dict[str, Any]:
    reply = {"event_id": event_id, "channel": "sms", "from": phone, "text": text}
    return reply if at is None else {**reply, "sent_at": at}


async def test_a_replayed_stop_or_start_changes_nothing(service: Service, tenant: Tenant) -> None:
    phone = "+48604" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"
    assert await _marketing_status(tenant, phone) == "delivered"
    stop, start = _reply(phone, f"r-{phone}-1", "STOP"), _reply(phone, f"r-{phone}-2", "START")

    assert (await _inbound(service, stop)).json() == {"received": 1, "applied": 1}
    assert (await _inbound(service, start)).json() == {"received": 1, "applied": 1}
    # A captured STOP posted again (its signature is fresh: the sandbox's has a timestamp,
    # Twilio's none at all) does not unsubscribe the number again.
    assert (await _inbound(service, stop)).json() == {"received": 1, "applied": 0}
    assert await _marketing_status(tenant, phone) == "delivered"

    again = _reply(phone, f"r-{phone}-3", "stop")
    assert (await _inbound(service, again)).json() == {"received": 1, "applied": 1}
    # Nor does the old START re-subscribe it.
    assert (await _inbound(service, start)).json() == {"received": 1, "applied": 0}
    assert await _marketing_status(tenant, phone) == "suppressed"


async def test_a_replayed_twilio_start_does_not_resubscribe(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    phone = "+48605" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"
    assert await _marketing_status(tenant, phone) == "delivered"
    url = f"{service.base_url}/v1/providers/twilio/inbound"
    validator = RequestValidator(simulators.twilio.auth_token)

    async def twilio_reply(sid: str, text: str) -> Any:
        form = {
            "MessageSid": sid,
            "AccountSid": simulators.twilio.account_sid,
            "From": phone,
            "To": "+15005550006",
            "Body": text,
        }
        signature = validator.compute_signature(url, form)
        async with httpx.AsyncClient() as twilio:
            answer = await twilio.post(url, data=form, headers={"X-Twilio-Signature": signature})
        return answer.json()

    start_sid = f"SM{uuid.uuid4().hex}"
    assert await twilio_reply(f"SM{uuid.uuid4().hex}", "STOP") == {"received": 1, "applied": 1}
    assert await twilio_reply(start_sid, "START") == {"received": 1, "applied": 1}
    assert await twilio_reply(f"SM{uuid.uuid4().hex}", "STOP") == {"received": 1, "applied": 1}
    assert await twilio_reply(start_sid, "START") == {"received": 1, "applied": 0}
    assert await _marketing_status(tenant, phone) == "suppressed"


async def test_replies_apply_in_the_providers_order_not_their_arrival(
    service: Service, tenant: Tenant
) -> None:
    phone = "+48606" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"
    assert await _marketing_status(tenant, phone) == "delivered"

    stop = _reply(phone, f"o-{phone}-2", "STOP", at="2026-06-01T12:00:05Z")
    late_start = _reply(phone, f"o-{phone}-1", "START", at="2026-06-01T12:00:00+00:00")
    assert (await _inbound(service, stop)).json() == {"received": 1, "applied": 1}
    # Sent before the STOP, delivered after it: the recipient's last word was STOP.
    assert (await _inbound(service, late_start)).json() == {"received": 1, "applied": 0}
    assert await _marketing_status(tenant, phone) == "suppressed"

    start = _reply(phone, f"o-{phone}-4", "START", at="2026-06-01T12:10:00Z")
    late_stop = _reply(phone, f"o-{phone}-3", "STOP", at="2026-06-01T12:09:00Z")
    assert (await _inbound(service, start)).json() == {"received": 1, "applied": 1}
    assert (await _inbound(service, late_stop)).json() == {"received": 1, "applied": 0}
    assert await _marketing_status(tenant, phone) == "delivered"

    # A time ahead of its arrival counts as its arrival: it does not outrank what follows.
    ahead = _reply(phone, f"o-{phone}-5", "STOP", at="2999-01-01T00:00:00Z")
    assert (await _inbound(service, ahead)).json() == {"received": 1, "applied": 1}
    now_start = _reply(phone, f"o-{phone}-6", "START")
    assert (await _inbound(service, now_start)).json() == {"received": 1, "applied": 1}
    assert await _marketing_status(tenant, phone) == "delivered"


async def test_one_claim_of_many_applies_each_address_its_own_suppression(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    """The engine looks up a whole batch's suppressions in one query: each message still
    meets exactly its own tenant's suppression of its own (normalised) address."""
    phones = [f"+486007{i:03d}99" for i in range(20)]  # …99: the sandbox delivers
    await suppress_via_api(tenant, "sms", "+48 600 700 399", "unsubscribed")
    await suppress_via_api(tenant, "sms", phones[11], "manual")
    await suppress_via_api(other_tenant, "sms", phones[5], "unsubscribed")
    body = {
        "category": "marketing",
        "cascade": [{"channel": "sms"}],
        "content": {"text": "Spring sale"},
        "messages": [{"to": {"phone": p}} for p in phones],
    }
    response = await tenant.client.post("/v1/messages/batch", json=body)
    assert response.status_code == 202, response.text
    ids = [r["id"] for r in response.json()["results"]]

    final = [await wait_until_final(tenant.client, i) for i in ids]

    suppressed = {i for i, m in enumerate(final) if m["status"] == "suppressed"}
    assert suppressed == {3, 11}
    assert {m["status"] for i, m in enumerate(final) if i not in suppressed} == {"delivered"}
