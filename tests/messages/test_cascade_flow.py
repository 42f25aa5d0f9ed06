"""A message through a whole cascade, watched through the public API."""

from __future__ import annotations

from tests.conftest import Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final


async def test_first_step_delivered_ends_the_cascade(tenant: Tenant) -> None:
    message_id = await send(tenant.client, message_body())

    message = await wait_until_final(tenant.client, message_id)

    assert message["status"] == "delivered"
    assert message["delivered_channel"] == "push"
    assert attempt_statuses(message) == [("push", "delivered")]
    assert [e["status"] for e in message["events"]] == [
        "accepted",
        "sending",
        "sent",
        "delivered",
        "delivered",
    ]
    assert [e["seq"] for e in message["events"]] == [1, 2, 3, 4, 5]


async def test_rejected_push_falls_over_to_sms(tenant: Tenant) -> None:
    body = message_body(
        to={"push_token": "device-reject", "phone": "+48600100200"},
        cascade=[{"channel": "push"}, {"channel": "sms"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"
    assert message["delivered_channel"] == "sms"
    assert attempt_statuses(message) == [("push", "rejected"), ("sms", "delivered")]
    assert message["attempts"][0]["error"]["code"] == "sandbox:rejected"


async def test_failure_receipt_falls_over_to_the_next_step(tenant: Tenant) -> None:
    body = message_body(
        to={"phone": "+48600100202", "email": "ann@example.com"},
        cascade=[{"channel": "sms"}, {"channel": "email"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    # Email succeeds on the relay's acceptance; the sandbox's later receipt may follow.
    assert attempt_statuses(message)[0] == ("sms", "failed")
    assert attempt_statuses(message)[1] in {("email", "sent"), ("email", "delivered")}
    assert message["delivered_channel"] == "email"
    failed = [e for e in message["events"] if e["status"] == "failed"]
    assert failed[0]["source"] == "provider"
    assert failed[0]["detail"]["code"] == "sandbox:undeliverable"


async def test_silent_push_falls_over_to_sms_after_timeout(tenant: Tenant) -> None:
    body = message_body(
        to={"push_token": "device-silent", "phone": "+48600100200"},
        cascade=[{"channel": "push", "timeout": 1}, {"channel": "sms"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("push", "expired"), ("sms", "delivered")]
    expired = next(e for e in message["events"] if e["status"] == "expired")
    assert expired["source"] == "timeout"


async def test_transient_errors_are_retried_inside_the_step(tenant: Tenant) -> None:
    body = message_body(to={"phone": "+48600100204"}, cascade=[{"channel": "sms"}])
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"
    assert attempt_statuses(message) == [("sms", "delivered")]
    assert message["attempts"][0]["tries"] == 3


async def test_every_step_failing_fails_the_message(tenant: Tenant) -> None:
    body = message_body(
        to={"push_token": "tok-reject", "phone": "+48600100202", "email": "bob+reject@example.com"}
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "failed"
    assert message["delivered_channel"] is None
    assert attempt_statuses(message) == [
        ("push", "rejected"),
        ("sms", "failed"),
        ("email", "rejected"),
    ]
    assert message["events"][-1]["status"] == "failed"
    assert message["events"][-1]["attempt"] is None


async def test_messenger_step_uses_whatsapp_or_telegram_address(tenant: Tenant) -> None:
    body = message_body(to={"telegram_chat_id": "123456"}, cascade=[{"channel": "messenger"}])
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["delivered_channel"] == "messenger"
