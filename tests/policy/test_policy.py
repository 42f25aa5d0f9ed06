"""The tenant's delivery policy: quiet hours (deferred, never dropped) and frequency caps."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from app.cascade import service as cascade
from app.db import Transaction
from app.ids import IdPrefix, from_public
from app.ledger import repository as ledger
from app.ledger.tables import messages
from app.runtime import Runtime, utcnow
from tests.conftest import Service, Tenant
from tests.helpers import (
    accept_without_wake,
    attempt_statuses,
    message_body,
    send,
    wait_until_final,
)


def marketing_sms(phone: str, **overrides: Any) -> dict[str, Any]:
    return message_body(
        category="marketing", to={"phone": phone}, cascade=[{"channel": "sms"}], **overrides
    )


def fresh_phone() -> str:
    # A sandbox number's last two digits pick its fate: "55" is always delivered.
    return "+48601" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"


async def put_policy(tenant: Tenant, **policy: Any) -> dict[str, Any]:
    response = await tenant.client.put("/v1/policy", json=policy)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def begin_step(
    tx: Transaction,
    runtime: Runtime,
    message_id: uuid.UUID | None,
    at: datetime,
    *,
    out_of_sight: bool = True,
) -> tuple[cascade.SendPlan | None, datetime | None]:
    """What the engine does with the message's current step when it is due at `at` (an
    injected clock), and the `due_at` that left it. `out_of_sight`: the message is then
    taken off the engine's index again, so the real engine (the real clock) never races
    the test for it."""
    assert message_id is not None
    message = await ledger.lock_message(tx.conn, message_id)
    assert message is not None
    attempts = await ledger.attempts_of(tx.conn, [message_id])
    current = next((a for a in attempts if a.step == message.current_step), None)
    plan = await cascade.begin_send(
        tx, runtime.providers, runtime.settings, message, current, False, at
    )
    moved = await ledger.get_message(tx.conn, message_id)
    assert moved is not None
    if out_of_sight:
        await tx.conn.execute(
            update(messages).where(messages.c.id == message_id).values(due_at=None)
        )
    return plan, moved.due_at


async def test_the_policy_has_defaults_and_is_validated(tenant: Tenant) -> None:
    default = (await tenant.client.get("/v1/policy")).json()
    saved = await put_policy(
        tenant,
        timezone="Europe/Warsaw",
        locale="pl",
        quiet_hours={"start": "21:00", "end": "08:00"},
        frequency_cap={"limit": 2, "window_seconds": 86400},
    )
    bad_zone = await tenant.client.put("/v1/policy", json={"timezone": "Mars/Olympus"})
    too_long = await tenant.client.put(
        "/v1/policy", json={"frequency_cap": {"limit": 1, "window_seconds": 40 * 86400}}
    )

    assert default == {
        "timezone": "UTC",
        "locale": "en",
        "quiet_hours": None,
        "frequency_cap": None,
        "skip_unreachable": None,
        "dedupe_window": None,
        "updated_at": None,
    }
    assert saved["quiet_hours"] == {"start": "21:00:00", "end": "08:00:00"}
    assert (await tenant.client.get("/v1/policy")).json() == saved
    assert bad_zone.status_code == 422
    assert bad_zone.json()["errors"][0]["path"] == "body.timezone"
    assert too_long.status_code == 422


async def test_marketing_in_quiet_hours_is_deferred_to_the_window_end(
    service: Service, tenant: Tenant
) -> None:
    await put_policy(
        tenant, timezone="Europe/Warsaw", quiet_hours={"start": "21:00", "end": "08:00"}
    )
    message_id = await accept_without_wake(
        service.worker_runtime, tenant.id, marketing_sms(fresh_phone()), timed=False
    )
    runtime = service.worker_runtime
    late_evening = datetime(2026, 6, 10, 21, 30, tzinfo=UTC)  # 23:30 in Warsaw
    morning = datetime(2026, 6, 11, 6, 0, tzinfo=UTC)  # 08:00 in Warsaw

    async with runtime.transaction() as tx:
        held, held_until = await begin_step(
            tx, runtime, from_public(IdPrefix.MESSAGE, message_id), late_evening
        )
        tx.jobs.clear()
    queued = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    async with runtime.transaction() as tx:
        sent, _ = await begin_step(tx, runtime, from_public(IdPrefix.MESSAGE, message_id), morning)
        tx.jobs.clear()

    assert held is None
    assert queued["status"] == "queued"
    assert queued["attempts"] == []
    assert queued["events"][-1]["status"] == "queued"
    assert queued["events"][-1]["detail"] == {
        "code": "quiet_hours",
        "until": "2026-06-11T06:00:00+00:00",
    }
    assert held_until == morning  # the engine takes it then
    assert sent is not None


async def test_the_recipients_own_time_zone_wins(service: Service, tenant: Tenant) -> None:
    await put_policy(
        tenant, timezone="Europe/Warsaw", quiet_hours={"start": "21:00", "end": "08:00"}
    )
    body = marketing_sms(fresh_phone())
    body["to"]["timezone"] = "America/New_York"
    message_id = await accept_without_wake(service.worker_runtime, tenant.id, body, timed=False)
    runtime = service.worker_runtime

    async with runtime.transaction() as tx:
        # 23:30 in Warsaw is 17:30 in New York: not quiet there.
        plan, _ = await begin_step(
            tx,
            runtime,
            from_public(IdPrefix.MESSAGE, message_id),
            datetime(2026, 6, 10, 21, 30, tzinfo=UTC),
        )
        tx.jobs.clear()

    assert plan is not None


async def test_a_deferred_message_is_sent_when_its_window_opens(
    service: Service, tenant: Tenant
) -> None:
    now = utcnow()
    # Quiet from 70 to 5 minutes ago: the step is held as if sent 10 minutes ago (an
    # injected clock), and the real worker, running at the real time, sends it.
    await put_policy(
        tenant,
        quiet_hours={
            "start": (now - timedelta(minutes=70)).strftime("%H:%M:%S"),
            "end": (now - timedelta(minutes=5)).strftime("%H:%M:%S"),
        },
    )
    message_id = await accept_without_wake(
        service.worker_runtime, tenant.id, marketing_sms(fresh_phone()), timed=False
    )
    runtime = service.worker_runtime
    async with runtime.transaction() as tx:
        # Left in the engine's sight: the real engine, at the real time, sends it.
        held, _ = await begin_step(
            tx,
            runtime,
            from_public(IdPrefix.MESSAGE, message_id),
            now - timedelta(minutes=10),
            out_of_sight=False,
        )

    message = await wait_until_final(tenant.client, message_id)

    assert held is None
    assert message["status"] == "delivered"
    assert [e["status"] for e in message["events"]][:3] == ["accepted", "queued", "sending"]


async def test_transactional_messages_ignore_quiet_hours(tenant: Tenant) -> None:
    now = utcnow()
    await put_policy(
        tenant,
        quiet_hours={
            "start": (now - timedelta(hours=1)).strftime("%H:%M"),
            "end": (now + timedelta(hours=1)).strftime("%H:%M"),
        },
    )
    body = {**marketing_sms(fresh_phone()), "category": "transactional"}
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"


async def test_marketing_over_the_frequency_cap_is_suppressed(tenant: Tenant) -> None:
    await put_policy(tenant, frequency_cap={"limit": 2, "window_seconds": 86400})
    phone = fresh_phone()

    statuses = []
    for _ in range(3):
        message = await wait_until_final(
            tenant.client, await send(tenant.client, marketing_sms(phone))
        )
        statuses.append(message["status"])
    transactional = await wait_until_final(
        tenant.client, await send(tenant.client, {**marketing_sms(phone), "category": "service"})
    )
    elsewhere = await wait_until_final(
        tenant.client, await send(tenant.client, marketing_sms(fresh_phone()))
    )

    assert statuses == ["delivered", "delivered", "suppressed"]
    assert message["attempts"] == []
    assert message["events"][-1]["detail"] == {"code": "frequency_cap"}
    assert transactional["status"] == "delivered"
    assert elsewhere["status"] == "delivered"


async def test_the_cap_counts_a_recipient_by_any_of_its_addresses(tenant: Tenant) -> None:
    await put_policy(tenant, frequency_cap={"limit": 1, "window_seconds": 3600})
    phone, email = fresh_phone(), f"{uuid.uuid4().hex[:10]}-ok@example.com"
    by_email = message_body(
        category="marketing", to={"email": email}, cascade=[{"channel": "email"}]
    )
    both = message_body(
        category="marketing",
        to={"phone": phone, "email": email},
        cascade=[{"channel": "sms"}, {"channel": "email"}],
    )

    first = await wait_until_final(tenant.client, await send(tenant.client, by_email))
    second = await wait_until_final(tenant.client, await send(tenant.client, both))

    assert (first["status"], second["status"]) == ("delivered", "suppressed")


async def test_the_cap_holds_under_concurrent_sends(tenant: Tenant) -> None:
    await put_policy(tenant, frequency_cap={"limit": 2, "window_seconds": 86400})
    phone = fresh_phone()

    ids = await asyncio.gather(*(send(tenant.client, marketing_sms(phone)) for _ in range(8)))
    final = [await wait_until_final(tenant.client, message_id) for message_id in ids]

    assert sorted(m["status"] for m in final) == ["delivered"] * 2 + ["suppressed"] * 6
    assert all(
        attempt_statuses(m) == [("sms", "delivered")] for m in final if m["status"] == "delivered"
    )
