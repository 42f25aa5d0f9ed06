"""`GET /v1/stats`: rollups written when messages end, read per bucket and range."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import Tenant
from tests.helpers import message_body, send, wait_until_final


async def stats(tenant: Tenant, **params: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    params.setdefault("from", (now - timedelta(hours=1)).isoformat())
    params.setdefault("to", (now + timedelta(minutes=1)).isoformat())
    response = await tenant.client.get("/v1/stats", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def run_cascades(tenant: Tenant) -> None:
    """One delivered on push, one falling over from push to SMS, one failed."""
    bodies = [
        message_body(to={"push_token": "device-ok"}, cascade=[{"channel": "push"}]),
        message_body(
            to={"push_token": "device-reject", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
        message_body(
            category="service", to={"phone": "+48600100201"}, cascade=[{"channel": "sms"}]
        ),
    ]
    for message_id in [await send(tenant.client, body) for body in bodies]:
        await wait_until_final(tenant.client, message_id)


async def test_stats_count_outcomes_steps_and_failover(tenant: Tenant) -> None:
    await run_cascades(tenant)

    body = await stats(tenant, bucket="minute")

    assert body["messages"] == 3
    assert body["by_status"] == {"delivered": 2, "failed": 1}
    assert body["failover_rate"] == 0.5
    assert [(c["category"], c["channel"], c["status"], c["messages"]) for c in body["counts"]] == [
        ("service", "sms", "failed", 1),
        ("transactional", "push", "delivered", 1),
        ("transactional", "sms", "delivered", 1),
    ]
    assert [(s["step"], s["reached"], s["delivered"], s["ended"]) for s in body["steps"]] == [
        (0, 3, 1, 2),
        (1, 1, 1, 1),
    ]
    assert body["steps"][0]["delivery_rate"] == 1 / 3
    assert body["steps"][1]["delivery_rate"] == 1.0
    latency = body["time_to_deliver"]
    assert latency["delivered"] == 2
    assert 0 < latency["median_ms"] <= latency["p95_ms"]
    assert latency["mean_ms"] > 0
    by_category = {c["category"]: c for c in body["by_category"]}
    assert by_category["transactional"]["delivered_on_later_step"] == 1
    assert by_category["transactional"]["failover_rate"] == 0.5
    assert by_category["service"]["delivered"] == 0
    assert by_category["service"]["failover_rate"] is None
    # The sandbox's example prices: push 0.0001 (a rejected push costs nothing), SMS to +48
    # 0.031 a segment.
    assert by_category["transactional"]["cost"] == "0.0311"
    assert sum(point["messages"] for point in body["series"]) == 3


async def test_every_bucket_size_adds_up_to_the_same_totals(tenant: Tenant) -> None:
    await run_cascades(tenant)

    minute, hour, day = [await stats(tenant, bucket=b) for b in ("minute", "hour", "day")]

    for body in (hour, day):
        assert body["by_status"] == minute["by_status"]
        assert body["steps"] == minute["steps"]
        assert body["time_to_deliver"] == minute["time_to_deliver"]
    assert {p["bucket"][11:] for p in day["series"]} == {"00:00:00Z"}
    assert {p["bucket"][14:] for p in hour["series"]} == {"00:00Z"}


async def test_stats_filter_by_category_and_stay_within_the_tenant(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    await run_cascades(tenant)

    service_only = await stats(tenant, category="service")
    assert service_only["by_status"] == {"failed": 1}
    empty = await stats(other_tenant)
    assert empty["messages"] == 0
    assert empty["steps"] == []
    assert empty["failover_rate"] is None
    assert empty["time_to_deliver"]["median_ms"] is None


async def test_ranges_are_bounded_per_bucket(tenant: Tenant) -> None:
    now = datetime.now(UTC)
    for bucket, days in (("minute", 2), ("hour", 40)):
        response = await tenant.client.get(
            "/v1/stats",
            params={
                "bucket": bucket,
                "from": (now - timedelta(days=days)).isoformat(),
                "to": now.isoformat(),
            },
        )
        assert response.status_code == 422, response.text
    backwards = await tenant.client.get(
        "/v1/stats", params={"from": now.isoformat(), "to": (now - timedelta(1)).isoformat()}
    )
    assert backwards.status_code == 422
    assert (await tenant.client.get("/v1/stats")).status_code == 200


async def test_series_has_one_row_per_bucket_category_channel_and_status(
    tenant: Tenant,
) -> None:
    # Both end delivered on transactional SMS: one on its first step, one on its second.
    bodies = [
        message_body(to={"phone": "+48600100200"}, cascade=[{"channel": "sms"}]),
        message_body(
            to={"push_token": "device-reject", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
    ]
    for message_id in [await send(tenant.client, body) for body in bodies]:
        await wait_until_final(tenant.client, message_id)

    for bucket in ("minute", "hour", "day"):
        body = await stats(tenant, bucket=bucket)
        keys = [(p["bucket"], p["category"], p["channel"], p["status"]) for p in body["series"]]
        assert len(keys) == len(set(keys)), body["series"]
        assert sum(p["messages"] for p in body["series"]) == 2
    hour = await stats(tenant, bucket="hour")
    if len({p["bucket"] for p in hour["series"]}) == 1:  # both ended in the same hour
        assert [(p["channel"], p["status"], p["messages"]) for p in hour["series"]] == [
            ("sms", "delivered", 2)
        ]
