"""Batch send: 1000 messages in one request and one transaction, a result per message,
idempotency per batch, and category isolation under a marketing flood."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import func, select, update

from app.ids import IdPrefix, from_public
from app.ledger.tables import attempts, events, messages
from app.runtime import utcnow
from tests.conftest import Service, Simulators, Tenant
from tests.helpers import send, wait_until_final


def phone(i: int) -> str:
    return f"+4860050{i:04d}"


def batch(items: list[dict[str, Any]], **defaults: Any) -> dict[str, Any]:
    return {
        "category": "transactional",
        "cascade": [{"channel": "sms"}],
        "content": {"text": "Your parcel is on its way"},
        **defaults,
        "messages": items,
    }


async def count(service_: Service, table: Any, tenant: Tenant) -> int:
    async with service_.worker_runtime.engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count()).select_from(table).where(table.c.tenant_id == tenant.id)
                )
            ).scalar_one()
        )


async def test_a_batch_of_1000_with_a_few_invalid_items(service: Service, tenant: Tenant) -> None:
    items: list[dict[str, Any]] = [
        {"to": {"phone": phone(i)}, "metadata": {"customer": f"c-{i}", "note": "x" * 250}}
        for i in range(1000)
    ]
    items[10]["to"] = {"phone": "+48123"}  # not a valid number
    items[500]["to"] = {"email": "ann@example.com"}  # no address for the SMS step
    items[777]["extra"] = True  # an unknown field
    send_at = utcnow() + timedelta(days=1)  # held: nothing is sent during the test
    body = orjson.dumps(batch(items, send_at=send_at.isoformat()))

    response = await tenant.client.post(
        "/v1/messages/batch", content=body, headers={"content-type": "application/json"}
    )
    result = response.json()

    assert len(body) > 256 * 1024  # over the single-message limit, within the batch one
    assert response.status_code == 207
    assert (result["accepted"], result["rejected"]) == (997, 3)
    assert [r["index"] for r in result["results"]] == list(range(1000))
    problems = {r["index"]: r["problem"] for r in result["results"] if "problem" in r}
    assert sorted(problems) == [10, 500, 777]
    assert problems[10]["status"] == 422
    assert problems[10]["errors"][0]["path"] == "body.messages[10].to.phone"
    assert problems[500]["errors"][0]["path"] == "body.messages[500].cascade[0].channel"
    assert problems[777]["errors"][0]["path"] == "body.messages[777].extra"
    ids = [r["id"] for r in result["results"] if "id" in r]
    assert {r["status"] for r in result["results"] if "id" in r} == {"queued"}
    assert await count(service, messages, tenant) == 997
    assert await count(service, events, tenant) == 997  # one `accepted` event each
    async with service.worker_runtime.engine.connect() as conn:
        due = await conn.execute(
            select(messages.c.due_at).where(
                messages.c.id.in_([from_public(IdPrefix.MESSAGE, i) for i in ids])
            )
        )
        # The delivery engine takes each at its send_at: a timer in Postgres, none in Redis.
        assert {row.due_at for row in due} == {send_at}
    message = (await tenant.client.get(f"/v1/messages/{ids[0]}")).json()
    assert message["metadata"]["customer"] == "c-0"
    assert message["status"] == "queued"


async def test_all_valid_is_202_and_none_valid_is_a_422_problem(tenant: Tenant) -> None:
    good = await tenant.client.post(
        "/v1/messages/batch", json=batch([{"to": {"phone": phone(i)}} for i in range(3)])
    )
    bad = await tenant.client.post(
        "/v1/messages/batch",
        json=batch([{"to": {"phone": "+1"}}, {"to": {"email": "ann@example.com"}}]),
    )

    assert good.status_code == 202
    assert good.json()["accepted"] == 3
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert [e["path"] for e in bad.json()["errors"]] == [
        "body.messages[0].to.phone",
        "body.messages[1].cascade[0].channel",
    ]


async def test_the_batch_as_a_whole_is_validated(tenant: Tenant) -> None:
    too_many = await tenant.client.post(
        "/v1/messages/batch", json=batch([{"to": {"phone": phone(0)}}] * 1001)
    )
    bad_default = await tenant.client.post(
        "/v1/messages/batch",
        json=batch([{"to": {"phone": phone(0)}}], cascade=[{"channel": "fax"}]),
    )

    assert too_many.status_code == 422
    assert bad_default.status_code == 422
    assert bad_default.json()["errors"][0]["path"] == "body.cascade[0].channel"


async def test_a_retried_batch_is_the_same_batch(tenant: Tenant) -> None:
    body = batch([{"to": {"phone": phone(i)}} for i in range(5)] + [{"to": {"phone": "+1"}}])
    headers = {"Idempotency-Key": f"campaign-{uuid.uuid4().hex}"}

    first = await tenant.client.post("/v1/messages/batch", json=body, headers=headers)
    again, concurrent = await asyncio.gather(
        tenant.client.post("/v1/messages/batch", json=body, headers=headers),
        tenant.client.post("/v1/messages/batch", json=body, headers=headers),
    )
    changed = await tenant.client.post(
        "/v1/messages/batch", json={**body, "content": {"text": "other"}}, headers=headers
    )

    assert first.status_code == again.status_code == concurrent.status_code == 207
    assert again.json() == first.json() == concurrent.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert changed.status_code == 409


async def test_item_keys_are_shared_with_single_sends(tenant: Tenant) -> None:
    key = f"order-{uuid.uuid4().hex}"
    single = {
        "category": "transactional",
        "to": {"phone": phone(1)},
        "content": {"text": "Your parcel is on its way"},
        "cascade": [{"channel": "sms"}],
    }
    first = await tenant.client.post("/v1/messages", json=single, headers={"Idempotency-Key": key})

    response = await tenant.client.post(
        "/v1/messages/batch",
        json=batch(
            [
                {"to": {"phone": phone(1)}, "idempotency_key": key},
                {"to": {"phone": phone(2)}, "idempotency_key": key},
                {"to": {"phone": phone(3)}, "idempotency_key": f"{key}-3"},
                {"to": {"phone": phone(4)}, "idempotency_key": f"{key}-3"},
            ]
        ),
    )
    results = response.json()["results"]

    assert results[0]["id"] == first.json()["id"]  # replayed, not a second message
    assert results[1]["problem"]["status"] == 409  # same key, another recipient
    assert results[2]["id"].startswith("msg_")
    assert results[3]["problem"]["status"] == 409  # the key twice in one batch


async def test_a_templated_batch_renders_each_recipients_data(
    tenant: Tenant, simulators: Simulators
) -> None:
    name = f"parcel-{uuid.uuid4().hex[:6]}"
    variants = {"sms": {"text": "{{ name }}: parcel {{ parcel }} arrives {{ day }}"}}
    for locale, sms in (("en", variants), ("pl", {"sms": {"text": "{{ name }}: {{ parcel }}"}})):
        created = await tenant.client.post(
            "/v1/templates", json={"name": name, "locale": locale, "variants": sms}
        )
        assert created.status_code == 201
    marker = uuid.uuid4().hex[:6]
    response = await tenant.client.post(
        "/v1/messages/batch",
        json=batch(
            [
                {"to": {"phone": phone(7)}, "data": {"name": "Ann", "parcel": f"{marker}-1"}},
                {
                    "to": {"phone": phone(8)},
                    "data": {"name": "Ola", "parcel": f"{marker}-2"},
                    "locale": "pl-PL",
                },
                {"to": {"phone": phone(9)}, "data": {"parcel": f"{marker}-3"}},
            ],
            cascade=[{"channel": "sms", "provider": "twilio"}],
            content={"template": name, "data": {"day": "today"}},
        ),
    )
    results = response.json()["results"]
    for result in results[:2]:
        await wait_until_final(tenant.client, result["id"])
    bodies = sorted(
        m.form["Body"]
        for m in simulators.twilio.message_submits
        if marker in m.form.get("Body", "")
    )

    assert response.status_code == 207
    assert bodies == [f"Ann: parcel {marker}-1 arrives today", f"Ola: {marker}-2"]
    assert results[2]["problem"]["errors"][0]["type"] == "missing_variable"
    assert results[2]["problem"]["errors"][0]["path"] == "body.messages[2].content.data"


async def test_transactional_is_not_held_up_by_a_marketing_flood(
    service: Service, tenant: Tenant
) -> None:
    # A marketing flood through an account allowing one send per two seconds: its engine
    # has it due all the time; the transactional engine never looks at it.
    flood = batch(
        [{"to": {"phone": f"+48600{i:04d}03"}} for i in range(1000)],
        category="marketing",
        cascade=[{"channel": "sms", "provider": "sandbox-slow", "timeout": 3600}],
    )
    response = await tenant.client.post("/v1/messages/batch", json=flood)
    assert response.status_code == 202, response.text
    flood_ids = [from_public(IdPrefix.MESSAGE, r["id"]) for r in response.json()["results"]]

    otp = await send(
        tenant.client,
        {
            "category": "transactional",
            "to": {"phone": "+48600100200"},
            "content": {"text": "Your code is 4711"},
            "cascade": [{"channel": "sms"}],
        },
    )
    delivered = await wait_until_final(tenant.client, otp)
    async with service.worker_runtime.engine.begin() as conn:
        sent = (
            await conn.execute(
                select(func.count())
                .select_from(attempts)
                .where(attempts.c.message_id.in_(flood_ids), attempts.c.status == "sent")
            )
        ).scalar_one()
        # Clean up: the rest of the flood would only slow the tests that follow.
        await conn.execute(
            update(messages)
            .where(messages.c.id.in_(flood_ids))
            .values(status="cancelled", due_at=None)
        )

    assert delivered["status"] == "delivered"
    # Delivered while the flood, accepted first, was still almost all waiting.
    assert sent < 100
