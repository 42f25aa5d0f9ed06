"""What the README's sandbox table says of emails, checked end to end: an email step
succeeds on acceptance by default, so `fail@` and `silent@` end delivered on email; with
`success_on: delivered` they fall over as the table says."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final

EMAIL_THEN_SMS = [{"channel": "email", "timeout": 2}, {"channel": "sms"}]


async def final(tenant: Tenant, email: str, cascade: list[dict[str, Any]]) -> dict[str, Any]:
    body = message_body(to={"email": email, "phone": "+48600100200"}, cascade=cascade)
    return await wait_until_final(tenant.client, await send(tenant.client, body))


async def test_fail_and_silent_emails_end_delivered_on_email_by_default(tenant: Tenant) -> None:
    failing = await final(tenant, "fail@example.com", EMAIL_THEN_SMS)
    silent = await final(tenant, "silent@example.com", EMAIL_THEN_SMS)

    assert (failing["status"], failing["delivered_channel"]) == ("delivered", "email")
    assert (silent["status"], silent["delivered_channel"]) == ("delivered", "email")
    assert attempt_statuses(silent) == [("email", "sent")]
    # The failure receipt (a bounce) comes later: recorded on the attempt, nothing resent.
    for _ in range(200):
        failing = (await tenant.client.get(f"/v1/messages/{failing['id']}")).json()
        if attempt_statuses(failing) == [("email", "failed")]:
            break
        await asyncio.sleep(0.05)
    assert attempt_statuses(failing) == [("email", "failed")]
    assert failing["status"] == "delivered"


async def test_with_success_on_delivered_fail_and_silent_emails_fall_over(
    tenant: Tenant,
) -> None:
    strict = [{**EMAIL_THEN_SMS[0], "success_on": "delivered"}, EMAIL_THEN_SMS[1]]

    failing = await final(tenant, "fail@example.com", strict)
    silent = await final(tenant, "silent@example.com", strict)

    assert attempt_statuses(failing) == [("email", "failed"), ("sms", "delivered")]
    assert attempt_statuses(silent) == [("email", "expired"), ("sms", "delivered")]
