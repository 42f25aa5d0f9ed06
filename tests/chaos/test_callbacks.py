"""Provider callbacks arrive twice, late, out of order and all at once: the ledger ends
where the receipts say, with each event recorded once."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import httpx

from tests.chaos.report import FaultRow
from tests.conftest import Service, Simulators, Tenant
from tests.helpers import message_body, send

NO_RECEIPT = "+48600100777"  # the Twilio simulator reports `sent`, never a final status


async def _sms_awaiting_receipt(tenant: Tenant, sims: Simulators) -> tuple[str, str, str]:
    """(message id, attempt id, Twilio SID) of an SMS Twilio took, with no receipt yet."""
    body = message_body(
        to={"phone": NO_RECEIPT},
        cascade=[{"channel": "sms", "provider": "twilio", "timeout": 300}],
    )
    message_id = await send(tenant.client, body)
    for _ in range(400):
        message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
        attempts = message["attempts"]
        if attempts and attempts[0]["status"] == "sent" and attempts[0]["provider_message_id"]:
            await sims.twilio.wait_for_status_reports()
            return message_id, attempts[0]["id"], attempts[0]["provider_message_id"]
        await asyncio.sleep(0.02)
    raise AssertionError("Twilio never took the SMS")


async def _callback(
    service: Service,
    sims: Simulators,
    attempt_id: str,
    sid: str,
    status: str,
    token: str | None = None,
) -> httpx.Response:
    """A StatusCallback exactly as Twilio signs it."""
    url = f"{service.settings.callback_base}/v1/providers/twilio/status?attempt={attempt_id}"
    params = {
        "AccountSid": sims.twilio.account_sid,
        "MessageSid": sid,
        "SmsSid": sid,
        "MessageStatus": status,
        "SmsStatus": status,
        "To": NO_RECEIPT,
    }
    if status in ("undelivered", "failed"):
        params["ErrorCode"] = "30003"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sims.twilio.sign(url, params),
        "I-Twilio-Idempotency-Token": token or str(uuid.uuid4()),
    }
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(url, content=urlencode(params).encode(), headers=headers)


def _duplicate_events(message: dict[str, Any]) -> int:
    """Events recorded more than once for the same attempt and status."""
    seen = Counter((e["attempt"], e["status"]) for e in message["events"])
    return sum(n - 1 for n in seen.values() if n > 1)


def _gap_free(message: dict[str, Any]) -> bool:
    return [e["seq"] for e in message["events"]] == list(range(1, len(message["events"]) + 1))


async def test_delivered_before_sent_and_failed_after_delivered_end_delivered(
    service: Service, simulators: Simulators, tenant: Tenant
) -> None:
    message_id, attempt_id, sid = await _sms_awaiting_receipt(tenant, simulators)

    answers = [
        await _callback(service, simulators, attempt_id, sid, status)
        for status in ("delivered", "sent", "undelivered", "failed", "sent", "delivered")
    ]

    message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    assert [a.status_code for a in answers] == [200] * 6
    assert [a.json()["applied"] for a in answers] == [1, 0, 0, 0, 0, 0]
    assert message["status"] == "delivered"
    assert message["attempts"][0]["status"] == "delivered"
    assert message["attempts"][0]["error"] is None
    assert [e["status"] for e in message["events"]] == [
        "accepted",
        "sending",
        "sent",
        "delivered",
        "delivered",
    ]
    assert _gap_free(message)


async def test_the_same_callback_five_times_at_once_is_applied_once(
    service: Service, simulators: Simulators, tenant: Tenant
) -> None:
    message_id, attempt_id, sid = await _sms_awaiting_receipt(tenant, simulators)
    token = str(uuid.uuid4())

    answers = await asyncio.gather(
        *(_callback(service, simulators, attempt_id, sid, "delivered", token) for _ in range(5))
    )

    message = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    assert [a.status_code for a in answers] == [200] * 5
    assert sum(a.json()["applied"] for a in answers) == 1
    assert message["status"] == "delivered"
    assert _duplicate_events(message) == 0
    assert _gap_free(message)


async def test_a_storm_of_duplicate_and_reordered_callbacks_leaves_a_consistent_ledger(
    service: Service, simulators: Simulators, tenant: Tenant, report_fault: list[FaultRow]
) -> None:
    rng = random.Random(11)
    targets = await asyncio.gather(*(_sms_awaiting_receipt(tenant, simulators) for _ in range(10)))
    calls = []
    for _, attempt_id, sid in targets:
        token = str(uuid.uuid4())
        plan = [("sent", None), ("delivered", token), ("delivered", token), ("delivered", None)]
        plan += [("undelivered", None), ("failed", None), ("sent", None)]
        rng.shuffle(plan)
        calls += [(attempt_id, sid, status, tok) for status, tok in plan]
    rng.shuffle(calls)

    answers = await asyncio.gather(
        *(_callback(service, simulators, a, s, status, tok) for a, s, status, tok in calls)
    )

    messages = [
        (await tenant.client.get(f"/v1/messages/{message_id}")).json()
        for message_id, _, _ in targets
    ]
    duplicates = sum(_duplicate_events(m) for m in messages)
    server_errors = sum(a.status_code >= 500 for a in answers)
    report_fault.append(
        FaultRow(
            "duplicate, reordered, concurrent callbacks",
            len(calls),
            len(messages),
            sum(m["status"] != "delivered" for m in messages),
            duplicates,
            server_errors,
            "duplicates = events recorded twice",
        )
    )
    assert Counter(a.status_code for a in answers) == {200: len(calls)}
    # Whatever the order, a delivery receipt came: failed-then-delivered ends delivered too.
    assert {m["status"] for m in messages} == {"delivered"}
    assert {m["attempts"][0]["status"] for m in messages} == {"delivered"}
    assert duplicates == 0
    assert all(_gap_free(m) for m in messages)
