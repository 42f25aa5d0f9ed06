"""Provider receipts that arrive together share one flush: each is applied as if alone,
in the order they came, and answered once committed."""

from __future__ import annotations

import asyncio
from typing import Any

from app.runtime import Runtime
from providers.base import ReceiptStatus, StatusUpdate
from tests.conftest import Service, Tenant
from tests.helpers import message_body, send, wait_until_final


async def _sent_sms(tenant: Tenant, cascade: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A message whose silent SMS step was handed to the sandbox and waits for a receipt."""
    body = message_body(
        to={"phone": "+48600100203", "email": "ann@example.com"},
        cascade=cascade or [{"channel": "sms", "timeout": 120}],
    )
    message_id = await send(tenant.client, body)
    for _ in range(300):
        message: dict[str, Any] = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
        if message["attempts"] and message["attempts"][0]["status"] == "sent":
            return message
        await asyncio.sleep(0.02)
    raise AssertionError("the SMS was never sent")


def _report(attempt: str, status: ReceiptStatus, event: str, **more: Any) -> StatusUpdate:
    return StatusUpdate(status=status, event_id=event, attempt_id=attempt, **more)


async def _together(runtime: Runtime, *callbacks: list[StatusUpdate]) -> list[int]:
    """Each callback's reports handed to the writer in the same turn: one flush."""
    writer = runtime.status_writer
    return list(await asyncio.gather(*(writer.record("sandbox", c) for c in callbacks)))


async def test_two_receipts_for_one_message_in_a_flush_apply_in_order(
    service: Service, tenant: Tenant
) -> None:
    message = await _sent_sms(tenant)
    attempt = message["attempts"][0]["id"]

    applied = await _together(
        service.api_runtime,
        [_report(attempt, ReceiptStatus.DELIVERED, "dlr-1")],
        [_report(attempt, ReceiptStatus.READ, "read-1")],
    )

    after = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    assert applied == [1, 1]
    assert after["status"] == "delivered"
    assert after["attempts"][0]["status"] == "read"
    timeline = [(e["status"], e["source"]) for e in after["events"]]
    assert timeline[-3:] == [
        ("delivered", "provider"),
        ("delivered", "provider"),
        ("read", "provider"),
    ]


async def test_a_duplicate_and_an_unknown_attempt_in_a_flush_change_nothing_else(
    service: Service, tenant: Tenant
) -> None:
    first, second = await _sent_sms(tenant), await _sent_sms(tenant)
    unknown = "att_" + "0" * 32

    applied = await _together(
        service.api_runtime,
        [_report(first["attempts"][0]["id"], ReceiptStatus.DELIVERED, "dup-1")],
        [_report(first["attempts"][0]["id"], ReceiptStatus.DELIVERED, "dup-1")],
        [_report(unknown, ReceiptStatus.DELIVERED, "nobody")],
        [
            _report(second["attempts"][0]["id"], ReceiptStatus.DELIVERED, "dlr-2"),
            _report(second["attempts"][0]["id"], ReceiptStatus.DELIVERED, "dlr-2"),
        ],
    )

    assert applied == [1, 0, 0, 1]
    for message in (first, second):
        after = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
        assert after["status"] == "delivered"
        assert [e["status"] for e in after["events"]].count("delivered") == 2  # attempt, message


async def test_a_failure_receipt_in_a_flush_falls_over_to_the_next_step(
    service: Service, tenant: Tenant
) -> None:
    failing = await _sent_sms(tenant, [{"channel": "sms", "timeout": 120}, {"channel": "email"}])
    delivered = await _sent_sms(tenant)

    applied = await _together(
        service.api_runtime,
        [
            _report(
                failing["attempts"][0]["id"],
                ReceiptStatus.FAILED,
                "fail-1",
                error_code="30003",
                error_detail="unreachable handset",
            )
        ],
        [_report(delivered["attempts"][0]["id"], ReceiptStatus.DELIVERED, "dlr-3")],
    )

    assert applied == [1, 1]
    final = await wait_until_final(tenant.client, failing["id"])
    assert (final["status"], final["delivered_channel"]) == ("delivered", "email")
    sms, email = final["attempts"]
    assert (sms["channel"], sms["status"]) == ("sms", "failed")
    # Email succeeds on acceptance; the sandbox's own receipt may follow, or not yet.
    assert (email["channel"], email["status"] in {"sent", "delivered"}) == ("email", True)
