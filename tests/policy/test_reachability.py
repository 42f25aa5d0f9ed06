"""`skip_unreachable`: a step whose address failed its last N attempts on the channel is
skipped at once (attempt `skipped`, `recipient_unreachable`) instead of waiting out its
timeout again; a delivery on the address resets it."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from app.policy.service import unreachable_since
from providers.sandbox import sign
from tests.conftest import Service, Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final
from tests.policy.test_policy import put_policy


def otp(token: str) -> dict[str, Any]:
    """Push (1 s window) falling over to SMS."""
    return message_body(
        to={"push_token": token, "phone": "+48600100200"},
        cascade=[{"channel": "push", "timeout": 1}, {"channel": "sms"}],
    )


async def _late_delivery(service: Service, attempt_id: str) -> None:
    body = orjson.dumps(
        {"event_id": f"late-{attempt_id}", "attempt_id": attempt_id, "status": "delivered"}
    )
    secret = service.settings.sandbox_secret.get_secret_value()
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        response = await client.post(
            "/v1/providers/sandbox/status",
            content=body,
            headers={"x-sandbox-signature": sign(secret, body, int(time.time()))},
        )
    assert response.json() == {"received": 1, "applied": 1}


async def test_after_three_silent_pushes_the_fourth_message_skips_push_at_once(
    service: Service, tenant: Tenant
) -> None:
    await put_policy(tenant, skip_unreachable={"after_failures": 3})
    token = f"device-{uuid.uuid4().hex[:8]}-silent"

    expired = [
        await wait_until_final(tenant.client, await send(tenant.client, otp(token)))
        for _ in range(3)
    ]
    fourth = await wait_until_final(tenant.client, await send(tenant.client, otp(token)))

    for message in expired:
        assert attempt_statuses(message) == [("push", "expired"), ("sms", "delivered")]
    assert attempt_statuses(fourth) == [("push", "skipped"), ("sms", "delivered")]
    skipped = fourth["attempts"][0]
    assert skipped["error"]["code"] == "recipient_unreachable"
    assert skipped["sent_at"] is None
    # Another token of the same tenant is not affected.
    other = await wait_until_final(
        tenant.client, await send(tenant.client, otp(f"device-{uuid.uuid4().hex[:8]}"))
    )
    assert attempt_statuses(other) == [("push", "delivered")]

    # A delivery on the address (a late receipt of one of the expired pushes) resets it.
    await _late_delivery(service, expired[-1]["attempts"][0]["id"])
    fifth = await wait_until_final(tenant.client, await send(tenant.client, otp(token)))
    assert attempt_statuses(fifth) == [("push", "expired"), ("sms", "delivered")]


async def test_without_the_policy_nothing_is_skipped_and_other_tenants_keep_their_own(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    await put_policy(other_tenant, skip_unreachable={"after_failures": 1})
    token = f"device-{uuid.uuid4().hex[:8]}-silent"

    for _ in range(2):
        message = await wait_until_final(tenant.client, await send(tenant.client, otp(token)))
        assert attempt_statuses(message) == [("push", "expired"), ("sms", "delivered")]
    # The other tenant has never failed on that token: its first message sends push.
    theirs = await wait_until_final(
        other_tenant.client, await send(other_tenant.client, otp(token))
    )
    assert attempt_statuses(theirs) == [("push", "expired"), ("sms", "delivered")]
    # ... and its second skips it.
    again = await wait_until_final(other_tenant.client, await send(other_tenant.client, otp(token)))
    assert attempt_statuses(again) == [("push", "skipped"), ("sms", "delivered")]


async def test_the_policy_is_validated(tenant: Tenant) -> None:
    saved = await put_policy(tenant, skip_unreachable={})
    too_many = await tenant.client.put(
        "/v1/policy", json={"skip_unreachable": {"after_failures": 11}}
    )

    assert saved["skip_unreachable"] == {"after_failures": 3, "window_seconds": 604800}
    assert too_many.status_code == 422
    assert too_many.json()["errors"][0]["path"].startswith("body.skip_unreachable")


def test_only_the_latest_failures_inside_the_window_count() -> None:
    at = datetime(2026, 12, 4, 12, tzinfo=UTC)
    day = timedelta(days=1)
    rule = (3, 7 * day)

    assert unreachable_since([at - 3 * day, at - 2 * day, at - day], rule, at) == at - 3 * day
    assert unreachable_since([at - 2 * day, at - day], rule, at) is None  # only two
    assert unreachable_since([at - 8 * day, at - 2 * day, at - day], rule, at) is None
    assert unreachable_since([at - 30 * day, at - 3 * day, at - 2 * day, at - day], rule, at)
    assert unreachable_since([at - day] * 3, None, at) is None
