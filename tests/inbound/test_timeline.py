"""Replies through the providers' inbound webhooks are kept once, reach the tenant's
webhooks as `inbound.received`, and sit in the recipient's timeline after the message
they answer; the timeline pages newest first and shows no other tenant's history."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql
from standardwebhooks import Webhook
from twilio.request_validator import RequestValidator

from app.inbound.service import conversations_query
from app.inbound.tables import inbound_messages
from app.messages.listing import bitmap_scans_only
from app.runtime import utcnow
from providers.base import Channel
from providers.sandbox import sign
from tests.conftest import Service, Simulators, Tenant
from tests.helpers import message_body, send, wait_until_final
from tests.webhooks.conftest import create_endpoint, deliveries
from tests.webhooks.receiver import Receiver


def new_phone() -> str:
    # …55: the sandbox delivers it.
    return f"+4860{uuid.uuid4().int % 10**5:05d}55"


def sms_to(phone: str, provider: str | None = None, text: str = "Your table is ready") -> Any:
    step: dict[str, Any] = {"channel": "sms"}
    if provider is not None:
        step["provider"] = provider
    return message_body(to={"phone": phone}, content={"text": text}, cascade=[step])


async def delivered(tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
    message = await wait_until_final(tenant.client, await send(tenant.client, body))
    assert message["status"] == "delivered", message
    return message


async def sandbox_reply(service: Service, payload: dict[str, Any]) -> httpx.Response:
    body = orjson.dumps(payload)
    secret = service.settings.sandbox_secret.get_secret_value()
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        return await client.post(
            "/v1/providers/sandbox/inbound",
            content=body,
            headers={"x-sandbox-signature": sign(secret, body, int(time.time()))},
        )


async def twilio_reply(
    service: Service, simulators: Simulators, phone: str, text: str, sid: str
) -> httpx.Response:
    """An incoming-message webhook as Twilio posts it, signed with the account's token."""
    url = f"{service.base_url}/v1/providers/twilio/inbound"
    form = {
        "MessageSid": sid,
        "AccountSid": simulators.twilio.account_sid,
        "From": phone,
        "To": "+15005550006",
        "Body": text,
    }
    signature = RequestValidator(simulators.twilio.auth_token).compute_signature(url, form)
    async with httpx.AsyncClient() as twilio:
        return await twilio.post(url, data=form, headers={"X-Twilio-Signature": signature})


async def timeline(tenant: Tenant, address: str, **params: Any) -> dict[str, Any]:
    response = await tenant.client.get(f"/v1/recipients/{address}/timeline", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def kinds(page: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            item["type"],
            item["message"]["id"] if item["type"] == "message" else item["inbound"]["id"],
        )
        for item in page["data"]
    ]


async def stored_rows(service: Service, provider: str, event_id: str) -> int:
    async with service.api_runtime.engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).where(
                inbound_messages.c.provider == provider, inbound_messages.c.event_id == event_id
            )
        )
    return int(count or 0)


async def test_a_sandbox_reply_is_kept_once_signed_to_the_webhook_and_in_the_timeline(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(
        tenant.client, receiver.url(), event_types=["inbound.received"]
    )
    receiver.secrets = [endpoint["secret"]]
    phone = new_phone()
    message = await delivered(tenant, sms_to(phone))
    reply = {
        "event_id": f"mo-{uuid.uuid4().hex}",
        "channel": "sms",
        "from": phone.replace("+48", "+48 "),
        "to": "+15005550006",
        "text": "Thanks, on my way",
    }

    first = await sandbox_reply(service, reply)
    again = await sandbox_reply(service, reply)  # the provider redelivers it

    assert first.json() == {"received": 1, "applied": 0}
    assert again.status_code == 200
    assert await stored_rows(service, "sandbox", reply["event_id"]) == 1
    [webhook] = await receiver.wait_for(1)
    assert webhook.verified
    assert Webhook(endpoint["secret"]).verify(webhook.body, webhook.headers)
    assert webhook.headers["webhook-id"].startswith("evt_")
    assert webhook.type == "inbound.received"
    data = webhook.data
    assert data["inbound_id"].startswith("inb_")
    assert {k: data[k] for k in ("channel", "provider", "from", "to", "text", "in_reply_to")} == {
        "channel": "sms",
        "provider": "sandbox",
        "from": phone,
        "to": "+15005550006",
        "text": "Thanks, on my way",
        "in_reply_to": message["id"],
    }
    [logged] = await deliveries(tenant.client, endpoint["id"])
    assert (logged["event_type"], logged["message_id"]) == ("inbound.received", message["id"])

    page = await timeline(tenant, phone)
    assert page["address"] == phone
    assert kinds(page) == [("inbound", data["inbound_id"]), ("message", message["id"])]
    inbound, outbound = page["data"]
    assert inbound["inbound"]["text"] == "Thanks, on my way"
    assert inbound["inbound"]["in_reply_to"] == message["id"]
    assert inbound["inbound"]["from"] == phone
    assert [a["id"] for a in outbound["attempts"]] == [a["id"] for a in message["attempts"]]
    assert outbound["attempts"][0]["status"] == "delivered"
    assert outbound["message"]["status"] == "delivered"


async def test_a_twilio_reply_reaches_the_webhook_and_the_timeline(
    service: Service, tenant: Tenant, simulators: Simulators, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(
        tenant.client, receiver.url(), event_types=["inbound.received"]
    )
    receiver.secrets = [endpoint["secret"]]
    phone = new_phone()
    message = await delivered(tenant, sms_to(phone, provider="twilio"))
    sid = f"SM{uuid.uuid4().hex}"

    answer = await twilio_reply(service, simulators, phone, "Can I move it to 8pm?", sid)
    replayed = await twilio_reply(service, simulators, phone, "Can I move it to 8pm?", sid)

    assert answer.json() == {"received": 1, "applied": 0}
    assert replayed.status_code == 200
    assert await stored_rows(service, "twilio", sid) == 1
    [inbound] = await receiver.wait_for(1)
    assert inbound.type == "inbound.received"
    assert Webhook(endpoint["secret"]).verify(inbound.body, inbound.headers)
    assert (inbound.data["provider"], inbound.data["from"], inbound.data["to"]) == (
        "twilio",
        phone,
        "+15005550006",
    )
    assert inbound.data["in_reply_to"] == message["id"]
    page = await timeline(tenant, phone, channel="sms")
    assert kinds(page) == [("inbound", inbound.data["inbound_id"]), ("message", message["id"])]
    assert page["data"][1]["attempts"][0]["provider"] == "twilio"


async def test_the_timeline_pages_newest_first_with_one_cursor(
    service: Service, tenant: Tenant
) -> None:
    phone = new_phone()
    expected: list[tuple[str, str]] = []
    for n in range(3):
        message = await delivered(tenant, sms_to(phone, text=f"Update {n}"))
        expected.append(("message", message["id"]))
        event_id = f"page-{uuid.uuid4().hex}"
        assert (
            await sandbox_reply(
                service, {"event_id": event_id, "channel": "sms", "from": phone, "text": f"ok {n}"}
            )
        ).status_code == 200
        [item] = [i for i in (await timeline(tenant, phone, limit=1))["data"]]
        assert item["type"] == "inbound" and item["inbound"]["text"] == f"ok {n}"
        expected.append(("inbound", item["inbound"]["id"]))
    expected.reverse()

    seen: list[tuple[str, str]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        page = await timeline(tenant, phone, **params)
        pages += 1
        seen += kinds(page)
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == expected
    assert pages == 3
    ats = [item["at"] for item in (await timeline(tenant, phone))["data"]]
    assert ats == sorted(ats, reverse=True)
    bad = await tenant.client.get(f"/v1/recipients/{phone}/timeline", params={"cursor": "nope"})
    assert bad.status_code == 422


async def test_no_tenant_sees_another_tenants_messages_or_replies(
    service: Service, tenant: Tenant, other_tenant: Tenant, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(
        other_tenant.client, receiver.url(), event_types=["inbound.received"]
    )
    receiver.secrets = [endpoint["secret"]]
    ours, theirs, shared = new_phone(), new_phone(), new_phone()
    await delivered(tenant, sms_to(ours))
    their_message = await delivered(other_tenant, sms_to(theirs))
    our_shared = await delivered(tenant, sms_to(shared))
    their_shared = await delivered(other_tenant, sms_to(shared))

    for phone in (ours, theirs, shared):
        reply = {"event_id": f"iso-{uuid.uuid4().hex}", "channel": "sms", "from": phone}
        answer = await sandbox_reply(service, {**reply, "text": f"hello from {phone}"})
        assert answer.status_code == 200

    # Another tenant's address: nothing of theirs, not even the reply to them.
    assert (await timeline(tenant, theirs))["data"] == []
    assert (await timeline(other_tenant, ours))["data"] == []
    # A shared address: each tenant its own message, and the reply as answering it.
    mine, yours = await timeline(tenant, shared), await timeline(other_tenant, shared)
    assert [i["type"] for i in mine["data"]] == ["inbound", "message"]
    assert mine["data"][1]["message"]["id"] == our_shared["id"]
    assert mine["data"][0]["inbound"]["in_reply_to"] == our_shared["id"]
    assert [i["type"] for i in yours["data"]] == ["inbound", "message"]
    assert yours["data"][1]["message"]["id"] == their_shared["id"]
    assert yours["data"][0]["inbound"]["in_reply_to"] == their_shared["id"]
    # The other tenant's webhook got its two replies, never the one to our address.
    received = await receiver.wait_for(2)
    assert all(r.verified for r in received)
    assert {r.data["from"]: r.data["in_reply_to"] for r in received} == {
        theirs: their_message["id"],
        shared: their_shared["id"],
    }
    assert len(await deliveries(other_tenant.client, endpoint["id"])) == 2


async def test_a_channel_filter_keeps_to_that_channels_fields_and_replies(
    service: Service, tenant: Tenant
) -> None:
    phone = new_phone()
    sms = await delivered(tenant, sms_to(phone))
    whatsapp = await wait_until_final(
        tenant.client,
        await send(
            tenant.client,
            message_body(
                to={"whatsapp": phone},
                content={"text": "Your table is ready"},
                cascade=[{"channel": "messenger", "provider": "sandbox"}],
            ),
        ),
    )
    await sandbox_reply(
        service,
        {"event_id": f"ch-{uuid.uuid4().hex}", "channel": "sms", "from": phone, "text": "yes"},
    )

    every = await timeline(tenant, phone)
    only_sms = await timeline(tenant, phone, channel="sms")
    only_messenger = await timeline(tenant, phone, channel="messenger")

    assert [i["type"] for i in every["data"]] == ["inbound", "message", "message"]
    assert {i["message"]["id"] for i in every["data"][1:]} == {sms["id"], whatsapp["id"]}
    assert [i.get("message", {}).get("id") for i in only_sms["data"]] == [None, sms["id"]]
    assert [i["message"]["id"] for i in only_messenger["data"]] == [whatsapp["id"]]
    refused = await tenant.client.get(
        "/v1/recipients/not-a-phone/timeline", params={"channel": "sms"}
    )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["path"] == "path.address"


async def test_a_reply_finds_its_tenants_through_the_search_index(service: Service) -> None:
    query = conversations_query(Channel.SMS, new_phone(), utcnow() - timedelta(days=30))
    compiled = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})

    async with service.api_runtime.engine.connect() as conn:
        await bitmap_scans_only(conn, True)
        plan = "\n".join(row[0] for row in await conn.execute(text(f"EXPLAIN {compiled}")))

    # A bitmap over each partition's GIN search index (migration 0003's messages_search).
    assert plan.count("Bitmap Index Scan on messages_") == 3
    assert "search_doc_idx" in plan
    assert "Seq Scan" not in plan
