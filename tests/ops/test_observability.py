"""`/metrics`, request ids, the event feed and the key admin API, over real HTTP."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import httpx
import structlog
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Service, Tenant
from tests.helpers import message_body, send, wait_until_final


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(service: Service) -> dict[Any, float]:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_metrics_count_accepts_attempts_and_queue_depth(
    service: Service, tenant: Tenant
) -> None:
    before = await scrape(service)
    fell_over = message_body(
        category="service",
        to={"push_token": "device-reject", "phone": "+48600100200"},
        cascade=[{"channel": "push"}, {"channel": "sms"}],
    )
    await wait_until_final(tenant.client, await send(tenant.client, fell_over))
    after = await scrape(service)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("cascade_messages_accepted_total", category="service") == 1
    # The worker keeps running other tests' leftovers: these may have grown by more.
    attempt = {"category": "service", "provider": "sandbox"}
    assert grew("cascade_attempts_total", channel="push", status="rejected", **attempt) >= 1
    assert grew("cascade_attempts_total", channel="sms", status="sent", **attempt) >= 1
    assert grew("cascade_attempts_total", channel="sms", status="delivered", **attempt) >= 1
    assert (
        grew(
            "cascade_messages_finished_total", category="service", channel="sms", status="delivered"
        )
        >= 1
    )
    send_latency = {"provider": "sandbox", "channel": "sms", "outcome": "sent"}
    assert grew("cascade_provider_send_seconds_count", **send_latency) >= 1
    receipt = {"provider": "sandbox", "channel": "sms", "status": "delivered"}
    assert grew("cascade_provider_receipt_seconds_count", **receipt) >= 1
    for category in ("transactional", "service", "marketing"):
        assert ("cascade_queue_depth", (("category", category), ("state", "ready"))) in after
        assert ("cascade_queue_depth", (("category", category), ("state", "deferred"))) in after
    route = {"method": "POST", "route": "/v1/messages", "status": "202"}
    assert grew("cascade_http_requests_total", **route) == 1


async def test_request_ids_are_echoed_or_made(tenant: Tenant) -> None:
    given = await tenant.client.get("/v1/messages", headers={"X-Request-ID": "req-42.abc"})
    assert given.headers["x-request-id"] == "req-42.abc"
    made = await tenant.client.get("/v1/messages")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    hostile = await tenant.client.get("/v1/messages", headers={"X-Request-ID": "a b\tc"})
    assert hostile.headers["x-request-id"] != "a b\tc"
    refused = await tenant.client.get("/v1/nothing-here", headers={"X-Request-ID": "r-404"})
    assert refused.status_code == 404
    assert refused.headers["x-request-id"] == "r-404"


async def feed(tenant: Tenant, **params: Any) -> dict[str, Any]:
    response = await tenant.client.get("/v1/events", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def settled_feed(tenant: Tenant, want: int, **params: Any) -> dict[str, Any]:
    """Poll until `want` events have settled (the feed holds back the last second)."""
    for _ in range(100):
        page = await feed(tenant, **params)
        if len(page["data"]) >= want:
            return page
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(page['data'])} events: {page}")


async def test_event_feed_follows_a_cursor_and_filters(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    first = await wait_until_final(
        tenant.client,
        await send(
            tenant.client, message_body(to={"push_token": "a"}, cascade=[{"channel": "push"}])
        ),
    )
    latest = await settled_feed(tenant, len(first["events"]), limit=200)
    assert [e["status"] for e in latest["data"]] == [e["status"] for e in first["events"]]
    assert {e["message_id"] for e in latest["data"]} == {first["id"]}
    sent = next(e for e in latest["data"] if e["status"] == "sent")
    assert (sent["channel"], sent["provider"], sent["step"]) == ("push", "sandbox", 0)

    second = await wait_until_final(
        tenant.client,
        await send(
            tenant.client,
            message_body(
                category="service", to={"phone": "+48600100201"}, cascade=[{"channel": "sms"}]
            ),
        ),
    )
    following = await settled_feed(tenant, len(second["events"]), cursor=latest["next_cursor"])
    assert {e["message_id"] for e in following["data"]} == {second["id"]}
    caught_up = await feed(tenant, cursor=following["next_cursor"])
    assert caught_up["data"] == []
    assert caught_up["next_cursor"] == following["next_cursor"]
    # `after` is the deprecated name of `cursor`, still accepted for one release.
    assert await feed(tenant, after=following["next_cursor"]) == caught_up
    both = {"after": following["next_cursor"], "cursor": following["next_cursor"]}
    assert (await tenant.client.get("/v1/events", params=both)).status_code == 422

    failures = await feed(tenant, status="failed", category="service", limit=200)
    assert [(e["message_id"], e["status"]) for e in failures["data"]] == [(second["id"], "failed")]
    assert (await feed(other_tenant, limit=200))["data"] == []
    for name in ("cursor", "after"):
        bad = await tenant.client.get("/v1/events", params={name: "nope"})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["type"] == "cursor"


async def test_admin_keys_are_shown_once_listed_and_revoked(
    service: Service, tenant: Tenant, other_tenant: Tenant
) -> None:
    created = await tenant.client.post("/v1/keys", json={"name": "ci", "scopes": ["read"]})
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["key"].startswith("csk_") and key["prefix"] == key["key"][:10]

    listed = (await tenant.client.get("/v1/keys")).json()["data"]
    assert [k["name"] for k in listed][:1] == ["ci"]
    assert all("key" not in k for k in listed)
    assert key["id"] not in [
        k["id"] for k in (await other_tenant.client.get("/v1/keys")).json()["data"]
    ]

    async with httpx.AsyncClient(
        base_url=service.base_url, headers={"Authorization": f"Bearer {key['key']}"}
    ) as reader:
        assert (await reader.get("/v1/messages")).status_code == 200
        assert (await reader.get("/v1/keys")).status_code == 403  # read is not admin
        assert (await other_tenant.client.delete(f"/v1/keys/{key['id']}")).status_code == 404
        assert (await tenant.client.delete(f"/v1/keys/{key['id']}")).status_code == 204
        assert (await reader.get("/v1/messages")).status_code == 401
    revoked = next(
        k for k in (await tenant.client.get("/v1/keys")).json()["data"] if k["id"] == key["id"]
    )
    assert revoked["revoked_at"] is not None
    assert (await tenant.client.delete(f"/v1/keys/key_{uuid.uuid4().hex}")).status_code == 404
    assert (
        await tenant.client.post("/v1/keys", json={"name": "x", "scopes": ["root"]})
    ).status_code == 422


async def test_worker_logs_name_the_message_attempt_and_tenant(tenant: Tenant) -> None:
    capture = structlog.testing.LogCapture()
    previous = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        message_id = await send(tenant.client, message_body(cascade=[{"channel": "push"}]))
        message = await wait_until_final(tenant.client, message_id)
    finally:
        structlog.configure(**previous)
    lines = capture.entries

    sent = [line for line in lines if line.get("message_id") == message_id]
    assert any(line["event"] == "step_sent" for line in sent), lines
    for line in sent:
        assert line["tenant"] == str(tenant.id)
        assert line["attempt"] == message["attempts"][0]["id"]


async def test_webhook_deliveries_are_counted_by_outcome(service: Service, tenant: Tenant) -> None:
    from tests.webhooks.conftest import create_endpoint
    from tests.webhooks.receiver import Receiver

    async with Receiver() as receiver:
        endpoint = await create_endpoint(tenant.client, receiver.url())
        receiver.secrets = [endpoint["secret"]]
        before = await scrape(service)
        message = await wait_until_final(
            tenant.client, await send(tenant.client, message_body(cascade=[{"channel": "push"}]))
        )
        await receiver.wait_for(len(message["events"]))
        async with asyncio.timeout(10):
            while True:  # counted once the delivery's answer is committed
                after = await scrape(service)
                grew = value(
                    after, "cascade_webhook_deliveries_total", outcome="succeeded"
                ) - value(before, "cascade_webhook_deliveries_total", outcome="succeeded")
                if grew >= len(message["events"]):
                    break
                await asyncio.sleep(0.05)
    assert grew >= len(message["events"])
