"""`dedupe_window`: the same content to a recipient sharing an address with a message sent
within the window is not sent again, on any channel: `suppressed`, reason `duplicate`."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from tests.conftest import Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final
from tests.policy.test_policy import put_policy


def phone() -> str:
    return "+48602" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"  # "55": delivered


def otp(to: dict[str, Any], text: str = "Your code is 4711") -> dict[str, Any]:
    steps = [{"channel": "push"}] if "push_token" in to else []
    return message_body(to=to, content={"text": text}, cascade=[*steps, {"channel": "sms"}])


async def test_the_same_message_to_a_shared_address_within_the_window_is_not_sent_again(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    await put_policy(tenant, dedupe_window=600)
    number = phone()
    first = await wait_until_final(
        tenant.client, await send(tenant.client, otp({"push_token": "device-a", "phone": number}))
    )
    # Another push token, the same phone: one shared address is enough.
    again = await wait_until_final(
        tenant.client, await send(tenant.client, otp({"push_token": "device-b", "phone": number}))
    )
    other_text = await wait_until_final(
        tenant.client,
        await send(tenant.client, otp({"phone": number}, text="Your code is 9999")),
    )
    theirs = await wait_until_final(
        other_tenant.client, await send(other_tenant.client, otp({"phone": number}))
    )

    assert first["status"] == "delivered"
    assert (again["status"], again["suppressed_reason"], again["duplicate_of"]) == (
        "suppressed",
        "duplicate",
        first["id"],
    )
    assert again["attempts"] == []
    assert other_text["status"] == "delivered"
    assert theirs["status"] == "delivered"  # another tenant's message is its own
    assert first["suppressed_reason"] is None and first["duplicate_of"] is None


async def test_a_message_the_recipient_did_not_get_is_no_original(tenant: Tenant) -> None:
    await put_policy(tenant, dedupe_window=600)
    rejected = "+48602" + str(uuid.uuid4().int % 10_000).zfill(4) + "01"  # "01": rejected
    body = message_body(to={"phone": rejected}, cascade=[{"channel": "sms"}])

    first = await wait_until_final(tenant.client, await send(tenant.client, body))
    retry = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert first["status"] == "failed"
    assert attempt_statuses(retry) == [("sms", "rejected")]  # tried again, not suppressed


async def test_concurrent_identical_messages_are_sent_once(tenant: Tenant) -> None:
    await put_policy(tenant, dedupe_window=600)
    body = otp({"phone": phone()})

    ids = await asyncio.gather(*(send(tenant.client, body) for _ in range(8)))
    final = [await wait_until_final(tenant.client, i) for i in ids]

    assert sorted(m["status"] for m in final) == ["delivered"] + ["suppressed"] * 7
    [original] = [m["id"] for m in final if m["status"] == "delivered"]
    assert {m["duplicate_of"] for m in final if m["status"] == "suppressed"} == {original}


async def test_without_a_window_identical_messages_are_all_sent(tenant: Tenant) -> None:
    body = otp({"phone": phone()})

    final = [await wait_until_final(tenant.client, await send(tenant.client, body)) for _ in "ab"]

    assert [m["status"] for m in final] == ["delivered", "delivered"]


async def test_one_number_is_one_address_whether_it_came_as_phone_or_whatsapp(
    tenant: Tenant,
) -> None:
    await put_policy(tenant, dedupe_window=600)
    number = phone()
    by_sms = message_body(
        to={"phone": number}, content={"text": "Your code is 4711"}, cascade=[{"channel": "sms"}]
    )
    by_whatsapp = message_body(
        to={"whatsapp": number},
        content={"text": "Your code is 4711"},
        cascade=[{"channel": "messenger", "provider": "sandbox"}],
    )

    first = await wait_until_final(tenant.client, await send(tenant.client, by_sms))
    again = await wait_until_final(tenant.client, await send(tenant.client, by_whatsapp))

    assert first["status"] == "delivered"
    assert (again["status"], again["duplicate_of"]) == ("suppressed", first["id"])
