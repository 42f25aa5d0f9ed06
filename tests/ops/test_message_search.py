"""`GET /v1/messages`: filters, keyset pagination, tenant isolation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.conftest import Service, Tenant
from tests.helpers import message_body, send, wait_until_final


async def search(tenant: Tenant, **params: Any) -> dict[str, Any]:
    response = await tenant.client.get("/v1/messages", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def ids(page: dict[str, Any]) -> list[str]:
    return [m["id"] for m in page["data"]]


async def test_pages_walk_all_messages_newest_first_without_overlap(tenant: Tenant) -> None:
    sent = [await send(tenant.client, message_body()) for _ in range(7)]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = await search(tenant, **params)
        seen += ids(page)
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == sent[::-1]
    assert pages == 3


async def test_filters_by_status_channel_category_and_provider(tenant: Tenant) -> None:
    delivered_push = await send(tenant.client, message_body())
    fell_over = await send(
        tenant.client,
        message_body(
            to={"push_token": "device-reject", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
    )
    failed = await send(
        tenant.client,
        message_body(
            category="service",
            to={"phone": "+48600100201"},
            cascade=[{"channel": "sms"}],
        ),
    )
    for message_id in (delivered_push, fell_over, failed):
        await wait_until_final(tenant.client, message_id)

    assert ids(await search(tenant, status="failed")) == [failed]
    assert ids(await search(tenant, status=["failed", "delivered"])) == [
        failed,
        fell_over,
        delivered_push,
    ]
    assert ids(await search(tenant, channel="sms")) == [fell_over]
    assert ids(await search(tenant, category="service")) == [failed]
    assert ids(await search(tenant, provider="sandbox", category="transactional")) == [
        fell_over,
        delivered_push,
    ]
    assert ids(await search(tenant, provider="twilio")) == []

    failure = (await search(tenant, status="failed"))["data"][0]["last_error"]
    assert (failure["step"], failure["channel"], failure["code"]) == (0, "sms", "sandbox:rejected")
    assert (await search(tenant, channel="push"))["data"][0]["last_error"] is None


async def test_recipient_matches_the_normalised_address_only(tenant: Tenant) -> None:
    by_phone = await send(
        tenant.client,
        message_body(to={"phone": "+48 600 100 299"}, cascade=[{"channel": "sms"}]),
    )
    by_email = await send(
        tenant.client,
        message_body(to={"email": "Ann.Smith@Example.COM"}, cascade=[{"channel": "email"}]),
    )
    by_token = await send(
        tenant.client,
        message_body(to={"push_token": "Device-AbC"}, cascade=[{"channel": "push"}]),
    )

    assert ids(await search(tenant, to="+48600100299")) == [by_phone]
    assert ids(await search(tenant, to="+48 600-100-299")) == [by_phone]
    assert ids(await search(tenant, to="ann.smith@example.com")) == [by_email]
    assert ids(await search(tenant, to="ANN.SMITH@EXAMPLE.COM")) == [by_email]
    assert ids(await search(tenant, to="Device-AbC")) == [by_token]
    # Tokens and ids are matched exactly as given.
    assert ids(await search(tenant, to="device-abc")) == []
    assert ids(await search(tenant, to="+48600100298")) == []


async def test_metadata_pairs_must_all_match(tenant: Tenant) -> None:
    both = await send(tenant.client, message_body(metadata={"order": "A-1", "shop": "north=1"}))
    order_only = await send(tenant.client, message_body(metadata={"order": "A-1"}))
    await send(tenant.client, message_body(metadata={"order": "A-2"}))

    assert ids(await search(tenant, metadata="order=A-1")) == [order_only, both]
    # The value may itself hold "=": only the first one separates key and value.
    assert ids(await search(tenant, metadata=["order=A-1", "shop=north=1"])) == [both]
    assert ids(await search(tenant, metadata="shop=north")) == []


async def test_created_range_is_inclusive_exclusive(tenant: Tenant) -> None:
    first = await send(tenant.client, message_body())
    second = await send(tenant.client, message_body())
    page = await search(tenant)
    created = {m["id"]: m["created_at"] for m in page["data"]}

    assert ids(await search(tenant, created_after=created[second])) == [second]
    assert ids(await search(tenant, created_before=created[second])) == [first]
    far = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert ids(await search(tenant, created_after=far)) == []


async def test_a_tenant_never_sees_another_tenants_messages(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = await send(tenant.client, message_body(metadata={"k": "v"}))
    theirs = [await send(other_tenant.client, message_body(metadata={"k": "v"})) for _ in range(2)]

    assert ids(await search(tenant)) == [mine]
    assert ids(await search(other_tenant)) == theirs[::-1]
    assert ids(await search(tenant, to="+48600100200", metadata="k=v")) == [mine]
    # A cursor is only a position in time: it never opens another tenant's rows.
    their_cursor = (await search(other_tenant, limit=1))["next_cursor"]
    assert ids(await search(tenant, cursor=their_cursor)) == [mine]


async def test_bad_parameters_are_problems(tenant: Tenant) -> None:
    for params in (
        {"limit": 201},
        {"limit": 0},
        {"cursor": "not-a-cursor"},
        {"metadata": "no-equals-sign"},
        {"status": "nonsense"},
        {"created_after": "2026-01-01T00:00:00"},  # no time zone
    ):
        response = await tenant.client.get("/v1/messages", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"


async def test_listing_needs_an_api_key(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as anonymous:
        response = await anonymous.get("/v1/messages")
    assert response.status_code == 401
