"""What the README's sandbox table says of emails, checked end to end: an email step
succeeds on acceptance by default, but waits out its window for a bounce. `fail@`'s bounce
inside the window falls over like an SMS failure receipt; `silent@` ends delivered on email
when the window closes. With `success_on: delivered`, `silent@` falls over too."""

from __future__ import annotations

import time
from typing import Any

import orjson
from pydantic import SecretStr

from providers.base import (
    Category,
    Channel,
    Content,
    OutboundMessage,
    ProviderCallback,
    Rejected,
)
from providers.sandbox import SandboxConfig, SandboxProvider, sign
from tests.conftest import Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final

EMAIL_THEN_SMS = [{"channel": "email", "timeout": 2}, {"channel": "sms"}]


async def final(tenant: Tenant, email: str, cascade: list[dict[str, Any]]) -> dict[str, Any]:
    body = message_body(to={"email": email, "phone": "+48600100200"}, cascade=cascade)
    return await wait_until_final(tenant.client, await send(tenant.client, body))


async def test_a_bounce_inside_the_window_falls_over_and_silence_delivers_on_email(
    tenant: Tenant,
) -> None:
    failing = await final(tenant, "fail@example.com", EMAIL_THEN_SMS)
    silent = await final(tenant, "silent@example.com", EMAIL_THEN_SMS)

    assert (failing["status"], failing["delivered_channel"]) == ("delivered", "sms")
    assert attempt_statuses(failing) == [("email", "failed"), ("sms", "delivered")]
    # The message was `sending` when the bounce came, never `delivered` on email.
    assert [e["status"] for e in failing["events"] if e["attempt"] is None] == [
        "accepted",
        "delivered",
    ]
    # No bounce within the window: delivered on email; the attempt says only `sent`.
    assert (silent["status"], silent["delivered_channel"]) == ("delivered", "email")
    assert attempt_statuses(silent) == [("email", "sent")]
    delivered = next(e for e in silent["events"] if e["status"] == "delivered")
    assert delivered["source"] == "timeout"


async def test_a_bounce_of_the_last_step_fails_the_message(tenant: Tenant) -> None:
    failing = await final(tenant, "fail@example.com", EMAIL_THEN_SMS[:1])

    assert failing["status"] == "failed"
    assert attempt_statuses(failing) == [("email", "failed")]


async def test_with_success_on_delivered_fail_and_silent_emails_fall_over(
    tenant: Tenant,
) -> None:
    strict = [{**EMAIL_THEN_SMS[0], "success_on": "delivered"}, EMAIL_THEN_SMS[1]]

    failing = await final(tenant, "fail@example.com", strict)
    silent = await final(tenant, "silent@example.com", strict)

    assert attempt_statuses(failing) == [("email", "failed"), ("sms", "delivered")]
    assert attempt_statuses(silent) == [("email", "expired"), ("sms", "delivered")]


async def test_sandbox_receipt_codes_carry_the_prefix_its_send_errors_do() -> None:
    provider = SandboxProvider(
        Channel.SMS, SandboxConfig(callback_url="http://127.0.0.1:9/", secret=SecretStr("s"))
    )
    reports = [
        {"event_id": "e1", "attempt_id": "att_1", "status": "failed", "error_code": "bounced"},
        {"event_id": "e2", "attempt_id": "att_2", "status": "failed"},
        {"event_id": "e3", "attempt_id": "att_3", "status": "delivered"},
    ]
    body = orjson.dumps({"receipts": reports})
    headers = {"X-Sandbox-Signature": sign("s", body, int(time.time()))}
    try:
        updates = await provider.parse_status(ProviderCallback("POST", "http://x", headers, body))
    finally:
        await provider.aclose()

    assert [u.error_code for u in updates] == ["sandbox:bounced", "sandbox:failed", None]
    rejected = await provider.send(
        OutboundMessage(
            message_id="msg_1",
            attempt_id="att_4",
            category=Category.TRANSACTIONAL,
            channel=Channel.SMS,
            address="+48600100201",
            content=Content(text="hi"),
            timeout_seconds=10,
        )
    )
    assert isinstance(rejected, Rejected)
    assert rejected.code == "sandbox:rejected"
