"""Managing webhook endpoints: admin only, secret shown once, validated, tenant-scoped."""

from __future__ import annotations

import httpx

from app.auth.service import Scope, issue_key
from app.runtime import utcnow
from tests.conftest import Service, Tenant
from tests.webhooks.conftest import create_endpoint
from tests.webhooks.receiver import Receiver


async def test_an_endpoint_is_created_listed_changed_and_deleted(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    created = await create_endpoint(
        tenant.client,
        receiver.url(),
        description="order updates",
        event_types=["message.delivered", "message.failed", "message.delivered"],
        categories=["transactional"],
    )
    assert created["event_types"] == ["message.delivered", "message.failed"]
    assert created["categories"] == ["transactional"]
    assert created["enabled"] is True
    endpoint_id = created["id"]

    fetched = (await tenant.client.get(f"/v1/webhooks/{endpoint_id}")).json()
    assert "secret" not in fetched  # shown once, at creation
    assert fetched == {k: v for k, v in created.items() if k != "secret"}
    listed = (await tenant.client.get("/v1/webhooks")).json()["data"]
    assert [e["id"] for e in listed] == [endpoint_id]

    changed = await tenant.client.patch(
        f"/v1/webhooks/{endpoint_id}",
        json={"description": "all updates", "event_types": None, "url": receiver.url("/v2")},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["description"] == "all updates"
    assert changed.json()["event_types"] is None  # null: every type
    assert changed.json()["categories"] == ["transactional"]  # not given: unchanged
    assert changed.json()["url"] == receiver.url("/v2")

    assert (await tenant.client.delete(f"/v1/webhooks/{endpoint_id}")).status_code == 204
    assert (await tenant.client.get(f"/v1/webhooks/{endpoint_id}")).status_code == 404
    assert (await tenant.client.delete(f"/v1/webhooks/{endpoint_id}")).status_code == 404
    assert (await tenant.client.get("/v1/webhooks")).json()["data"] == []


async def test_managing_webhooks_needs_the_admin_scope(service: Service, tenant: Tenant) -> None:
    async with service.worker_runtime.engine.begin() as conn:
        issued = await issue_key(
            conn,
            service.settings.api_key_pepper.get_secret_value(),
            tenant.id,
            "sender",
            utcnow(),
            frozenset({Scope.SEND, Scope.READ}),
        )
    async with httpx.AsyncClient(
        base_url=service.base_url, headers={"Authorization": f"Bearer {issued.key}"}
    ) as client:
        listed = await client.get("/v1/webhooks")
        created = await client.post("/v1/webhooks", json={"url": "https://93.184.216.34/"})
    assert (listed.status_code, created.status_code) == (403, 403)
    async with httpx.AsyncClient(base_url=service.base_url) as anonymous:
        assert (await anonymous.get("/v1/webhooks")).status_code == 401


async def test_unknown_filters_and_malformed_ids_are_refused(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    bad_type = await tenant.client.post(
        "/v1/webhooks", json={"url": receiver.url(), "event_types": ["message.exploded"]}
    )
    assert bad_type.status_code == 422
    assert bad_type.json()["errors"][0]["path"].startswith("body.event_types")
    empty = await tenant.client.post("/v1/webhooks", json={"url": receiver.url(), "categories": []})
    assert empty.status_code == 422
    test_type = await tenant.client.post(
        "/v1/webhooks", json={"url": receiver.url(), "event_types": ["webhook.test"]}
    )
    assert test_type.status_code == 422
    assert (await tenant.client.get("/v1/webhooks/msg_123")).status_code == 404
    endpoint = await create_endpoint(tenant.client, receiver.url())
    for name in ("cursor", "before"):
        page = await tenant.client.get(
            f"/v1/webhooks/{endpoint['id']}/deliveries", params={name: "nope"}
        )
        assert page.status_code == 422
        assert page.json()["errors"][0]["type"] == "cursor"
