"""Idempotency-Key: a retried request is the same message, never a second one."""

from __future__ import annotations

import asyncio

from tests.conftest import Tenant
from tests.helpers import message_body


async def test_same_key_same_body_returns_the_original_response(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "order-17-otp"}
    first = await tenant.client.post("/v1/messages", json=message_body(), headers=headers)
    again = await tenant.client.post("/v1/messages", json=message_body(), headers=headers)

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_same_key_different_body_is_a_conflict(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "order-18-otp"}
    await tenant.client.post("/v1/messages", json=message_body(), headers=headers)
    other = message_body(content={"text": "a different text"})

    response = await tenant.client.post("/v1/messages", json=other, headers=headers)

    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/conflict")


async def test_concurrent_duplicates_create_one_message(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "burst-1"}
    responses = await asyncio.gather(
        *(
            tenant.client.post("/v1/messages", json=message_body(), headers=headers)
            for _ in range(10)
        )
    )

    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1


async def test_keys_are_scoped_per_tenant(tenant: Tenant, other_tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "shared-key"}
    mine = await tenant.client.post("/v1/messages", json=message_body(), headers=headers)
    theirs = await other_tenant.client.post("/v1/messages", json=message_body(), headers=headers)

    assert mine.json()["id"] != theirs.json()["id"]
