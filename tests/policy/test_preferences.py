"""Recipient preferences: opted-out channels are skipped (attempt `suppressed`, error
`preference`), and `reorder: true` tries the preferred channel first."""

from __future__ import annotations

import uuid
from typing import Any

from tests.conftest import Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final


def person() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    number = "+48603" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"  # "55": delivered
    return {"phone": number, "email": f"ann-{tag}@example.com", "push_token": f"device-{tag}"}


async def put(tenant: Tenant, address: str, **body: Any) -> dict[str, Any]:
    response = await tenant.client.put(f"/v1/recipients/{address}/preferences", json=body)
    assert response.status_code == 200, response.text
    saved: dict[str, Any] = response.json()
    return saved


async def final(tenant: Tenant, **body: Any) -> dict[str, Any]:
    return await wait_until_final(tenant.client, await send(tenant.client, message_body(**body)))


async def test_an_opted_out_channel_is_skipped_for_its_category_only(tenant: Tenant) -> None:
    to = person()
    saved = await put(tenant, to["phone"], opt_out={"marketing": ["sms"]})
    cascade = [{"channel": "sms"}, {"channel": "email", "timeout": 1}]

    marketing = await final(tenant, category="marketing", to=to, cascade=cascade)
    transactional = await final(tenant, to=to, cascade=cascade)

    assert saved["address_key"] == f"phone:{to['phone']}"
    assert saved["opt_out"] == {"marketing": ["sms"]}
    assert attempt_statuses(marketing) == [("sms", "suppressed"), ("email", "delivered")]
    assert marketing["attempts"][0]["error"]["code"] == "preference"
    assert marketing["delivered_channel"] == "email"
    assert attempt_statuses(transactional) == [("sms", "delivered")]


async def test_preferences_of_any_of_the_recipients_addresses_apply(tenant: Tenant) -> None:
    to = person()
    await put(tenant, to["email"].upper(), opt_out={"transactional": ["push"]})

    message = await final(tenant, to=to, cascade=[{"channel": "push"}, {"channel": "sms"}])

    assert attempt_statuses(message) == [("push", "suppressed"), ("sms", "delivered")]


async def test_reorder_tries_the_preferred_channel_first(tenant: Tenant) -> None:
    to = person()
    await put(tenant, to["push_token"], preferred_channel="sms")
    cascade = [
        {"channel": "push"},
        {"channel": "messenger", "provider": "sandbox"},
        {"channel": "sms"},
    ]
    to_all = {**to, "whatsapp": to["phone"]}

    reordered = await final(tenant, to=to_all, cascade=cascade, reorder=True)
    as_given = await final(tenant, to=to_all, cascade=cascade)

    assert [s["channel"] for s in reordered["cascade"]] == ["sms", "push", "messenger"]
    assert attempt_statuses(reordered) == [("sms", "delivered")]
    assert attempt_statuses(as_given) == [("push", "delivered")]


async def test_preferences_are_read_replaced_deleted_and_validated(tenant: Tenant) -> None:
    to = person()
    spaced = to["phone"][:3] + " " + to["phone"][3:]
    await put(tenant, spaced, opt_out={"marketing": ["email", "sms"]}, preferred_channel="push")
    replaced = await put(tenant, to["phone"], opt_out={"service": ["sms"]})
    read = (await tenant.client.get(f"/v1/recipients/{to['phone']}/preferences")).json()
    bad_phone = await tenant.client.put("/v1/recipients/+1/preferences", json={})
    bad_channel = await tenant.client.put(
        f"/v1/recipients/{to['phone']}/preferences", json={"opt_out": {"marketing": ["fax"]}}
    )
    deleted = await tenant.client.delete(f"/v1/recipients/{to['phone']}/preferences")
    gone = await tenant.client.get(f"/v1/recipients/{to['phone']}/preferences")

    assert replaced == read
    assert (read["opt_out"], read["preferred_channel"]) == ({"service": ["sms"]}, None)
    assert bad_phone.status_code == 422
    assert bad_phone.json()["errors"][0]["path"] == "path.address"
    assert bad_channel.status_code == 422
    assert deleted.status_code == 204
    assert gone.status_code == 404
