"""Replies over WhatsApp, Viber and SMPP, posted by the simulators exactly as the
providers do (WhatsApp and Viber on the status callback URL, SMPP as a mobile-originated
deliver_sm on the bound session): kept once, in the timeline, sent to the tenant's
webhooks as `inbound.received`, STOP applied; a forged signature stores nothing."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from standardwebhooks import Webhook

from app.inbound.tables import inbound_messages
from providers.smpp_pdu import CommandStatus
from tests.conftest import Service, Simulators, Tenant
from tests.helpers import message_body, send, wait_until_final
from tests.inbound.test_timeline import kinds, stored_rows, timeline
from tests.webhooks.conftest import create_endpoint
from tests.webhooks.receiver import Receiver


def new_phone() -> str:
    # …55: every simulator delivers it.
    return f"+4861{uuid.uuid4().int % 10**5:05d}55"


def whatsapp_to(phone: str, category: str = "transactional") -> dict[str, Any]:
    return message_body(
        category=category,
        to={"whatsapp": phone},
        content={"text": "Your table is ready"},
        cascade=[{"channel": "messenger", "provider": "whatsapp"}],
    )


async def outcome(tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
    return await wait_until_final(tenant.client, await send(tenant.client, body))


async def inbound_endpoint(tenant: Tenant, receiver: Receiver) -> dict[str, Any]:
    endpoint = await create_endpoint(
        tenant.client, receiver.url(), event_types=["inbound.received"]
    )
    receiver.secrets = [endpoint["secret"]]
    return endpoint


async def test_a_whatsapp_reply_on_the_status_webhook_is_kept_once_and_sent_on(
    service: Service, tenant: Tenant, simulators: Simulators, receiver: Receiver
) -> None:
    endpoint = await inbound_endpoint(tenant, receiver)
    phone = new_phone()
    message = await outcome(tenant, whatsapp_to(phone))
    assert message["status"] == "delivered", message

    reply = await simulators.whatsapp.send_text(phone, "Can I bring my dog?")
    again = await simulators.whatsapp.redeliver(reply)

    assert (reply.status_code, reply.answer_json()) == (200, {"received": 1, "applied": 0})
    assert again.status_code == 200
    [wamid] = [m["id"] for m in reply.json()["entry"][0]["changes"][0]["value"]["messages"]]
    assert await stored_rows(service, "whatsapp", wamid) == 1
    [webhook] = await receiver.wait_for(1)
    assert Webhook(endpoint["secret"]).verify(webhook.body, webhook.headers)
    assert webhook.type == "inbound.received"
    data = webhook.data
    assert {k: data[k] for k in ("channel", "provider", "from", "to", "text", "in_reply_to")} == {
        "channel": "messenger",
        "provider": "whatsapp",
        "from": phone,
        "to": "+" + simulators.whatsapp.display_phone_number,
        "text": "Can I bring my dog?",
        "in_reply_to": message["id"],
    }
    page = await timeline(tenant, phone, channel="messenger")
    assert kinds(page) == [("inbound", data["inbound_id"]), ("message", message["id"])]


async def test_a_whatsapp_webhook_with_a_status_and_a_reply_applies_both(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    whatsapp = simulators.whatsapp
    phone = new_phone()
    message = await outcome(tenant, whatsapp_to(phone))
    wamid = message["attempts"][0]["provider_message_id"]
    status = whatsapp.status_payload(wamid, phone[1:], "read")
    text = whatsapp.inbound_text_payload(phone[1:], "Thanks!")
    both = status
    messages = text["entry"][0]["changes"][0]["value"]["messages"]
    both["entry"][0]["changes"][0]["value"]["messages"] = messages

    sent = await whatsapp.post_webhook(both)

    assert (sent.status_code, sent.answer_json()) == (200, {"received": 2, "applied": 1})
    [reply_id] = [m["id"] for m in messages]
    assert await stored_rows(service, "whatsapp", reply_id) == 1
    after = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    assert after["attempts"][0]["status"] == "read"
    assert [i["type"] for i in (await timeline(tenant, phone))["data"]] == ["inbound", "message"]


async def test_a_whatsapp_stop_suppresses_marketing_to_that_number(
    tenant: Tenant, simulators: Simulators
) -> None:
    phone = new_phone()
    assert (await outcome(tenant, whatsapp_to(phone, "marketing")))["status"] == "delivered"

    stop = await simulators.whatsapp.send_text(phone, "STOP")
    marketing = await outcome(tenant, whatsapp_to(phone, "marketing"))
    transactional = await outcome(tenant, whatsapp_to(phone))
    start = await simulators.whatsapp.send_text(phone, "START")
    resumed = await outcome(tenant, whatsapp_to(phone, "marketing"))

    assert stop.answer_json() == {"received": 1, "applied": 1}
    assert marketing["status"] == "suppressed"
    assert transactional["status"] == "delivered"
    assert start.answer_json() == {"received": 1, "applied": 1}
    assert resumed["status"] == "delivered"


async def test_a_forged_whatsapp_reply_is_refused_and_stores_nothing(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    whatsapp = simulators.whatsapp
    phone = new_phone()
    assert (await outcome(tenant, whatsapp_to(phone, "marketing")))["status"] == "delivered"
    payload = whatsapp.inbound_text_payload(phone[1:], "STOP")

    forged = await whatsapp.post_webhook(payload, app_secret="not-the-app-secret")

    assert forged.status_code == 401
    [wamid] = [m["id"] for m in payload["entry"][0]["changes"][0]["value"]["messages"]]
    assert await stored_rows(service, "whatsapp", wamid) == 0
    assert (await timeline(tenant, phone))["data"][0]["type"] == "message"
    assert (await outcome(tenant, whatsapp_to(phone, "marketing")))["status"] == "delivered"


def new_viber_id() -> str:
    # Base64-like, as Viber's are; no simulator ending, so Viber delivers.
    return f"{uuid.uuid4().hex[:22]}Ab=="


def viber_to(viber_id: str, category: str = "transactional") -> dict[str, Any]:
    return message_body(
        category=category,
        to={"viber_id": viber_id},
        content={"text": "Your table is ready"},
        cascade=[{"channel": "messenger", "provider": "viber"}],
    )


async def test_a_viber_reply_on_the_bot_webhook_is_kept_once_and_sent_on(
    service: Service, tenant: Tenant, simulators: Simulators, receiver: Receiver
) -> None:
    endpoint = await inbound_endpoint(tenant, receiver)
    subscriber = new_viber_id()
    message = await outcome(tenant, viber_to(subscriber))
    assert message["status"] == "delivered", message

    reply = await simulators.viber.send_text(subscriber, "See you at 8")
    again = await simulators.viber.redeliver(reply)

    assert (reply.response_status, reply.answer_json()) == (200, {"received": 1, "applied": 0})
    assert again.response_status == 200
    assert await stored_rows(service, "viber", str(reply.json()["message_token"])) == 1
    [webhook] = await receiver.wait_for(1)
    assert Webhook(endpoint["secret"]).verify(webhook.body, webhook.headers)
    assert webhook.type == "inbound.received"
    data = webhook.data
    assert {k: data[k] for k in ("channel", "provider", "from", "text", "in_reply_to")} == {
        "channel": "messenger",
        "provider": "viber",
        "from": subscriber,
        "text": "See you at 8",
        "in_reply_to": message["id"],
    }
    page = await timeline(tenant, subscriber)
    assert kinds(page) == [("inbound", data["inbound_id"]), ("message", message["id"])]


async def test_a_viber_stop_suppresses_marketing_and_a_forged_one_stores_nothing(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    viber = simulators.viber
    subscriber = new_viber_id()
    assert (await outcome(tenant, viber_to(subscriber, "marketing")))["status"] == "delivered"
    forged_stop = viber.message_payload(subscriber, "STOP")

    forged = await viber.post_callback(forged_stop, auth_token="not-the-auth-token")
    still = await outcome(tenant, viber_to(subscriber, "marketing"))
    stop = await viber.send_text(subscriber, "stop")
    stopped = await outcome(tenant, viber_to(subscriber, "marketing"))

    assert forged.response_status == 401
    assert await stored_rows(service, "viber", str(forged_stop["message_token"])) == 0
    assert still["status"] == "delivered"
    assert stop.answer_json() == {"received": 1, "applied": 1}
    assert stopped["status"] == "suppressed"


def sms_over_smpp(phone: str, category: str = "transactional") -> dict[str, Any]:
    return message_body(
        category=category,
        to={"phone": phone},
        content={"text": "Your table is ready"},
        cascade=[{"channel": "sms", "provider": "smpp"}],
    )


async def test_an_smpp_mobile_originated_reply_is_kept_once_and_sent_on(
    service: Service, tenant: Tenant, simulators: Simulators, receiver: Receiver
) -> None:
    endpoint = await inbound_endpoint(tenant, receiver)
    phone = new_phone()
    message = await outcome(tenant, sms_over_smpp(phone))
    assert message["status"] == "delivered", message

    first = await simulators.smsc.send_mo(phone, "Spóźnię się 10 minut")  # UCS-2
    again = await simulators.smsc.send_mo(phone, "Spóźnię się 10 minut")  # redelivered

    assert (first, again) == (CommandStatus.ESME_ROK, CommandStatus.ESME_ROK)
    [webhook] = await receiver.wait_for(1)
    assert Webhook(endpoint["secret"]).verify(webhook.body, webhook.headers)
    assert webhook.type == "inbound.received"
    data = webhook.data
    assert {k: data[k] for k in ("channel", "provider", "from", "to", "text", "in_reply_to")} == {
        "channel": "sms",
        "provider": "smpp",
        "from": phone,
        "to": "Cascade",
        "text": "Spóźnię się 10 minut",
        "in_reply_to": message["id"],
    }
    page = await timeline(tenant, phone)
    assert kinds(page) == [("inbound", data["inbound_id"]), ("message", message["id"])]
    async with service.api_runtime.engine.connect() as conn:
        rows = await conn.scalar(
            select(func.count()).where(
                inbound_messages.c.provider == "smpp", inbound_messages.c.address == phone
            )
        )
    assert rows == 1


async def test_an_smpp_stop_in_message_payload_suppresses_marketing(
    tenant: Tenant, simulators: Simulators
) -> None:
    phone = new_phone()
    assert (await outcome(tenant, sms_over_smpp(phone, "marketing")))["status"] == "delivered"

    answer = await simulators.smsc.send_mo(phone, "STOP", in_payload=True)
    stopped = await outcome(tenant, sms_over_smpp(phone, "marketing"))

    assert answer == CommandStatus.ESME_ROK
    assert stopped["status"] == "suppressed"
