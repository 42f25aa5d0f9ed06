"""Ledger events reach integrators' endpoints signed, filtered, retried and replayable."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import update
from standardwebhooks import Webhook

from app.ids import IdPrefix, from_public
from app.webhooks.events import event_type
from app.webhooks.retries import JITTER, RETRY_SCHEDULE
from app.webhooks.tables import webhook_endpoints
from tests.conftest import Service, Tenant
from tests.helpers import message_body, send, wait_until_final
from tests.webhooks.conftest import WebhookJobs, create_endpoint, deliveries
from tests.webhooks.receiver import Receiver

PUSH_ONLY = [{"channel": "push"}]


def _expected_types(message: dict[str, Any]) -> dict[int, str]:
    """What each ledger event of the message is called in a webhook, by sequence."""
    return {
        e["seq"]: event_type(e["status"], about_attempt=e["attempt"] is not None)
        for e in message["events"]
    }


async def _wait_for_deliveries(
    client: httpx.AsyncClient,
    endpoint_id: str,
    ready: Callable[[list[dict[str, Any]]], bool],
    within: float = 10.0,
) -> list[dict[str, Any]]:
    async with asyncio.timeout(within):
        while True:
            found = await deliveries(client, endpoint_id)
            if ready(found):
                return found
            await asyncio.sleep(0.02)


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _attempted(delivery: dict[str, Any]) -> bool:
    """At least one attempt made and its answer recorded (not merely claimed)."""
    return delivery["attempts"] >= 1 and (
        delivery["status"] != "pending" or delivery["error"] is not None
    )


def _on_schedule(waited: timedelta, planned: timedelta) -> bool:
    """Within the jitter; the wait runs from the attempt's end, so allow for its latency."""
    return planned * (1 - JITTER) <= waited <= planned * (1 + JITTER) + timedelta(seconds=1)


async def test_each_ledger_event_arrives_signed_with_status_and_sequence(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(tenant.client, receiver.url(), description="orders")
    receiver.secrets = [endpoint["secret"]]
    assert endpoint["secret"].startswith("whsec_")
    assert endpoint["id"].startswith("whe_")

    message_id = await send(
        tenant.client, message_body(cascade=PUSH_ONLY, metadata={"order": "A-17"})
    )
    message = await wait_until_final(tenant.client, message_id)
    expected = _expected_types(message)
    received = await receiver.wait_for(len(expected))

    assert all(r.verified for r in received)
    # The library's own check, on the exact bytes and headers that arrived.
    for request in received:
        assert Webhook(endpoint["secret"]).verify(request.body, request.headers)
        assert request.headers["webhook-id"].startswith("evt_")
        assert request.headers["webhook-signature"].startswith("v1,")
        assert request.headers["webhook-timestamp"].isdigit()
    by_sequence = {r.data["sequence"]: r for r in received}
    assert {seq: r.type for seq, r in by_sequence.items()} == expected
    assert list(expected.values()) == [
        "message.accepted",
        "message.attempt.sending",
        "message.attempt.sent",
        "message.attempt.delivered",
        "message.delivered",
    ]
    delivered = by_sequence[max(by_sequence)]
    assert delivered.data == {
        "message_id": message_id,
        "category": "transactional",
        "status": "delivered",
        "sequence": 5,
        "delivered_channel": "push",
        "metadata": {"order": "A-17"},
        "attempt": None,
    }
    assert delivered.payload["timestamp"].endswith("Z")
    sent = by_sequence[3].data["attempt"]
    assert sent["id"] == message["attempts"][0]["id"]
    provider = message["attempts"][0]["provider"]
    assert (sent["channel"], sent["provider"], sent["status"]) == ("push", provider, "sent")

    log = await _wait_for_deliveries(
        tenant.client,
        endpoint["id"],
        lambda found: (
            len(found) == len(expected) and all(d["status"] == "succeeded" for d in found)
        ),
    )
    assert {d["event_type"] for d in log} == set(expected.values())
    for entry in log:
        assert entry["id"].startswith("whd_")
        assert entry["message_id"] == message_id
        assert (entry["attempts"], entry["response_status_code"]) == (1, 200)
        assert entry["response_body"] == "ok"
        assert entry["latency_ms"] >= 0
        assert entry["next_retry_at"] is None


async def test_endpoints_receive_only_the_types_and_categories_they_filter_for(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    delivered_only = await create_endpoint(
        tenant.client, receiver.url("/delivered"), event_types=["message.delivered"]
    )
    service_only = await create_endpoint(
        tenant.client, receiver.url("/service"), categories=["service"]
    )
    failed_transactional = await create_endpoint(
        tenant.client,
        receiver.url("/failed"),
        event_types=["message.attempt.failed"],
        categories=["transactional"],
    )
    # Push rejected at send, then delivered by SMS.
    transactional = await send(
        tenant.client,
        message_body(
            to={"push_token": "device-reject", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
    )
    service_message = await send(tenant.client, message_body(category="service", cascade=PUSH_ONLY))
    await wait_until_final(tenant.client, transactional)
    second = await wait_until_final(tenant.client, service_message)

    delivered = await receiver.wait_for(2, "/delivered")
    assert sorted(r.data["message_id"] for r in delivered) == sorted(
        [transactional, service_message]
    )
    assert {r.type for r in delivered} == {"message.delivered"}
    failed = await receiver.wait_for(1, "/failed")
    assert failed[0].type == "message.attempt.failed"
    assert failed[0].data["message_id"] == transactional
    assert failed[0].data["attempt"]["status"] == "rejected"
    assert failed[0].data["attempt"]["error"]["code"] == "sandbox:rejected"
    service_events = await receiver.wait_for(len(second["events"]), "/service")
    assert {r.data["message_id"] for r in service_events} == {service_message}
    assert {r.data["category"] for r in service_events} == {"service"}

    # Both messages are dispatched completely (the last events arrived), so the logs are whole.
    assert len(await deliveries(tenant.client, delivered_only["id"])) == 2
    assert len(await deliveries(tenant.client, failed_transactional["id"])) == 1
    service_log = await deliveries(tenant.client, service_only["id"])
    assert {d["message_id"] for d in service_log} == {service_message}


async def test_a_receiver_down_then_up_gets_the_event_on_a_retry(
    service: Service, tenant: Tenant, webhook_jobs: WebhookJobs
) -> None:
    async with Receiver(start_now=False) as receiver:
        endpoint = await create_endpoint(
            tenant.client, receiver.url(), event_types=["message.accepted"]
        )
        receiver.secrets = [endpoint["secret"]]
        message_id = await send(tenant.client, message_body(cascade=PUSH_ONLY))
        [first] = await _wait_for_deliveries(
            tenant.client, endpoint["id"], lambda found: bool(found) and _attempted(found[0])
        )
        assert first["status"] == "pending"
        assert "ConnectError" in first["error"]
        assert first["response_status_code"] is None
        waited = _at(first["next_retry_at"]) - _at(first["last_attempt_at"])
        assert _on_schedule(waited, RETRY_SCHEDULE[1])

        await receiver.start()
        # The retry job as the worker would run it once its time has come.
        await webhook_jobs.deliver(first["id"], 1, _at(first["next_retry_at"]))

        [arrived] = await receiver.wait_for(1)
        assert arrived.verified
        assert arrived.data["message_id"] == message_id
        [after] = await deliveries(tenant.client, endpoint["id"])
        assert (after["status"], after["attempts"], after["response_status_code"]) == (
            "succeeded",
            2,
            200,
        )
        assert after["error"] is None
        # The late job for the same attempt finds nothing left to do.
        await webhook_jobs.deliver(first["id"], 1, _at(first["next_retry_at"]))
        assert len(receiver.received) == 1


async def test_a_receiver_failing_forever_fails_the_delivery_then_disables_the_endpoint(
    service: Service, tenant: Tenant, receiver: Receiver, webhook_jobs: WebhookJobs
) -> None:
    receiver.answer, receiver.answer_body = 500, "x" * 5000
    endpoint = await create_endpoint(tenant.client, receiver.url())
    message_id = await send(tenant.client, message_body(cascade=PUSH_ONLY))
    message = await wait_until_final(tenant.client, message_id)
    count = len(message["events"])
    log = await _wait_for_deliveries(
        tenant.client,
        endpoint["id"],
        lambda found: len(found) == count and all(map(_attempted, found)),
    )
    started = min(_at(d["last_attempt_at"]) for d in log)
    first_id = log[-1]["id"]  # newest first: the last is the oldest

    # Walk the oldest delivery through its schedule, each attempt at its due time.
    delays: list[timedelta] = []
    while True:
        [current] = [
            d for d in await deliveries(tenant.client, endpoint["id"]) if d["id"] == first_id
        ]
        if current["status"] != "pending":
            break
        due = _at(current["next_retry_at"])
        delays.append(due - _at(current["last_attempt_at"]))
        await webhook_jobs.deliver(first_id, current["attempts"], due)

    assert current["status"] == "failed"
    assert current["attempts"] == len(RETRY_SCHEDULE)
    assert current["response_status_code"] == 500
    assert current["response_body"] == "x" * 1024  # stored truncated
    assert current["error"] == "HTTP 500"
    for delay, planned in zip(delays, RETRY_SCHEDULE[1:], strict=True):
        assert _on_schedule(delay, planned)
    assert (await tenant.client.get(f"/v1/webhooks/{endpoint['id']}")).json()["enabled"]

    # Still failing five days after the first failure: the endpoint is given up on.
    other = next(d for d in await deliveries(tenant.client, endpoint["id"]) if d["id"] != first_id)
    await webhook_jobs.deliver(
        other["id"], other["attempts"], started + timedelta(days=5, minutes=1)
    )

    state = (await tenant.client.get(f"/v1/webhooks/{endpoint['id']}")).json()
    assert state["enabled"] is False
    assert "5 days" in state["disabled_reason"]
    assert "HTTP 500" in state["disabled_reason"]
    after = await deliveries(tenant.client, endpoint["id"])
    assert {d["status"] for d in after} == {"failed"}
    assert all(d["next_retry_at"] is None for d in after)
    # A disabled endpoint gets no new deliveries.
    await wait_until_final(
        tenant.client, await send(tenant.client, message_body(cascade=PUSH_ONLY))
    )
    assert len(await deliveries(tenant.client, endpoint["id"])) == count


async def test_after_rotation_both_secrets_sign_for_24_hours_then_only_the_new_one(
    service: Service, tenant: Tenant, receiver: Receiver, webhook_jobs: WebhookJobs
) -> None:
    endpoint = await create_endpoint(
        tenant.client, receiver.url(), event_types=["message.accepted"]
    )
    old_secret = endpoint["secret"]
    rotated = await tenant.client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != old_secret
    overlap_ends = _at(rotated.json()["previous_secret_expires_at"])

    await send(tenant.client, message_body(cascade=PUSH_ONLY))
    [during] = await receiver.wait_for(1)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for secret in (old_secret, new_secret):
        assert Webhook(secret).verify(during.body, during.headers)

    # After the overlap only the new secret signs (checked by signing as the library does:
    # its verify() refuses a timestamp a day ahead of the wall clock).
    receiver.answer = 503
    await send(tenant.client, message_body(cascade=PUSH_ONLY))
    pending = await _wait_for_deliveries(
        tenant.client,
        endpoint["id"],
        lambda found: len(found) == 2 and _attempted(found[0]),
    )
    later = overlap_ends + timedelta(minutes=1)
    await webhook_jobs.deliver(pending[0]["id"], 1, later)
    after = receiver.received[-1]
    webhook_id = after.headers["webhook-id"]
    assert after.headers["webhook-timestamp"] == str(int(later.timestamp()))
    assert after.headers["webhook-signature"] == Webhook(new_secret).sign(
        webhook_id, later, after.body.decode()
    )


async def test_replay_sends_one_delivery_again_or_all_failed_since_a_time(
    service: Service, tenant: Tenant
) -> None:
    async with Receiver(start_now=False) as receiver:
        endpoint = await create_endpoint(tenant.client, receiver.url())
        receiver.secrets = [endpoint["secret"]]
        message_id = await send(tenant.client, message_body(cascade=PUSH_ONLY))
        count = len((await wait_until_final(tenant.client, message_id))["events"])
        await _wait_for_deliveries(
            tenant.client,
            endpoint["id"],
            lambda found: len(found) == count and all(map(_attempted, found)),
        )
        # The integrator pauses the endpoint (pending deliveries fail), fixes the receiver...
        paused = await tenant.client.patch(
            f"/v1/webhooks/{endpoint['id']}", json={"enabled": False}
        )
        assert paused.json()["enabled"] is False
        failed = await deliveries(tenant.client, endpoint["id"], status="failed")
        assert len(failed) == count
        refused = await tenant.client.post(
            f"/v1/webhooks/{endpoint['id']}/replay", json={"since": "2020-01-01T00:00:00Z"}
        )
        assert refused.status_code == 409

        await receiver.start()
        resumed = await tenant.client.patch(
            f"/v1/webhooks/{endpoint['id']}", json={"enabled": True}
        )
        assert resumed.json()["enabled"] is True
        since = min(d["created_at"] for d in failed)
        replayed = await tenant.client.post(
            f"/v1/webhooks/{endpoint['id']}/replay", json={"since": since}
        )
        assert replayed.status_code == 202, replayed.text
        assert replayed.json() == {"replayed": count}

        arrived = await receiver.wait_for(count)
        assert all(r.verified for r in arrived)
        assert {r.data["message_id"] for r in arrived} == {message_id}
        log = await _wait_for_deliveries(
            tenant.client,
            endpoint["id"],
            lambda found: all(d["status"] == "succeeded" for d in found),
        )

        # One delivery again, by id: the same event id and the same bytes.
        one = log[0]
        again = await tenant.client.post(
            f"/v1/webhooks/{endpoint['id']}/replay", json={"delivery_id": one["id"]}
        )
        assert again.json() == {"replayed": 1}
        repeated = (await receiver.wait_for(count + 1))[-1]
        first_time = next(
            r for r in arrived if r.headers["webhook-id"] == repeated.headers["webhook-id"]
        )
        assert repeated.headers["webhook-id"] == one["event_id"]
        assert repeated.body == first_time.body
        assert repeated.verified
        log = await _wait_for_deliveries(
            tenant.client,
            endpoint["id"],
            lambda found: next(d for d in found if d["id"] == one["id"])["status"] == "succeeded",
        )
        replayed_entry = next(d for d in log if d["id"] == one["id"])
        assert replayed_entry["attempts"] == one["attempts"] + 1

        unknown = await tenant.client.post(
            f"/v1/webhooks/{endpoint['id']}/replay",
            json={"delivery_id": "whd_" + "0" * 32},
        )
        assert unknown.status_code == 404
        both = await tenant.client.post(
            f"/v1/webhooks/{endpoint['id']}/replay",
            json={"delivery_id": one["id"], "since": since},
        )
        assert both.status_code == 422


async def test_replay_since_sends_every_delivery_again_and_recover_only_the_failed(
    service: Service, tenant: Tenant
) -> None:
    async with Receiver() as receiver:
        endpoint = await create_endpoint(
            tenant.client, receiver.url(), event_types=["message.delivered"]
        )
        path = f"/v1/webhooks/{endpoint['id']}"
        receiver.secrets = [endpoint["secret"]]
        ok_message = await send(tenant.client, message_body(cascade=PUSH_ONLY))
        await wait_until_final(tenant.client, ok_message)
        await receiver.wait_for(1)
        # A second delivery fails: the receiver is broken, the integrator pauses the endpoint.
        receiver.answer = 500
        broken_message = await send(tenant.client, message_body(cascade=PUSH_ONLY))
        await wait_until_final(tenant.client, broken_message)
        await _wait_for_deliveries(
            tenant.client,
            endpoint["id"],
            lambda found: len(found) == 2 and all(map(_attempted, found)),
        )
        await tenant.client.patch(path, json={"enabled": False})
        await tenant.client.patch(path, json={"enabled": True})
        receiver.answer = 200
        log = await _wait_for_deliveries(
            tenant.client,
            endpoint["id"],
            lambda found: sorted(d["status"] for d in found) == ["failed", "succeeded"],
        )
        since = min(d["created_at"] for d in log)

        recovered = await tenant.client.post(f"{path}/recover", json={"since": since})

        assert recovered.status_code == 202, recovered.text
        assert recovered.json() == {"replayed": 1}
        assert (await receiver.wait_for(3))[-1].data["message_id"] == broken_message
        await _wait_for_deliveries(
            tenant.client,
            endpoint["id"],
            lambda found: all(d["status"] == "succeeded" for d in found),
        )
        nothing_failed = await tenant.client.post(f"{path}/recover", json={"since": since})
        assert nothing_failed.json() == {"replayed": 0}

        replayed = await tenant.client.post(f"{path}/replay", json={"since": since})

        assert replayed.json() == {"replayed": 2}
        again = await receiver.wait_for(5)
        assert {r.data["message_id"] for r in again[3:]} == {ok_message, broken_message}
        assert all(r.verified for r in again)
        naive = await tenant.client.post(f"{path}/recover", json={"since": "2026-01-01T00:00:00"})
        assert naive.status_code == 422


async def test_the_test_event_is_sent_now_and_returns_the_receivers_answer(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(
        tenant.client, receiver.url(), event_types=["message.delivered"]
    )
    receiver.secrets = [endpoint["secret"]]
    receiver.answer_body = "thanks"

    response = await tenant.client.post(f"/v1/webhooks/{endpoint['id']}/test")

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["succeeded"] is True
    assert (result["status_code"], result["response_body"]) == (200, "thanks")
    [arrived] = receiver.received
    assert arrived.verified
    assert arrived.type == "webhook.test"
    assert arrived.data == {"endpoint_id": endpoint["id"]}
    assert arrived.headers["webhook-id"] == result["webhook_id"]

    receiver.answer = 418
    failing = (await tenant.client.post(f"/v1/webhooks/{endpoint['id']}/test")).json()
    assert (failing["succeeded"], failing["status_code"], failing["error"]) == (
        False,
        418,
        "HTTP 418",
    )


async def test_a_tenant_receives_and_sees_only_its_own_events(
    service: Service, tenant: Tenant, other_tenant: Tenant, receiver: Receiver
) -> None:
    mine = await create_endpoint(tenant.client, receiver.url("/mine"))
    theirs = await create_endpoint(other_tenant.client, receiver.url("/theirs"))

    my_message = await send(tenant.client, message_body(cascade=PUSH_ONLY))
    their_message = await send(other_tenant.client, message_body(cascade=PUSH_ONLY))
    mine_count = len((await wait_until_final(tenant.client, my_message))["events"])
    theirs_count = len((await wait_until_final(other_tenant.client, their_message))["events"])
    await receiver.wait_for(mine_count, "/mine")
    await receiver.wait_for(theirs_count, "/theirs")

    assert {r.data["message_id"] for r in receiver.on("/mine")} == {my_message}
    assert {r.data["message_id"] for r in receiver.on("/theirs")} == {their_message}
    listed = (await tenant.client.get("/v1/webhooks")).json()["data"]
    assert [e["id"] for e in listed] == [mine["id"]]
    their_delivery = (await deliveries(other_tenant.client, theirs["id"]))[0]["id"]

    path = f"/v1/webhooks/{theirs['id']}"
    for method, url, body in [
        ("GET", path, None),
        ("PATCH", path, {"description": "mine now"}),
        ("DELETE", path, None),
        ("POST", f"{path}/rotate-secret", None),
        ("POST", f"{path}/test", None),
        ("GET", f"{path}/deliveries", None),
        ("POST", f"{path}/replay", {"since": "2020-01-01T00:00:00Z"}),
        ("POST", f"{path}/recover", {"since": "2020-01-01T00:00:00Z"}),
        ("POST", f"/v1/webhooks/{mine['id']}/replay", {"delivery_id": their_delivery}),
    ]:
        response = await tenant.client.request(method, url, json=body)
        assert response.status_code == 404, (method, url, response.text)
    assert (await other_tenant.client.get(path)).json()["description"] == ""


async def _break_url(service: Service, endpoint_id: str, url: str) -> None:
    """An endpoint registered before its URL was checked as the HTTP client reads it."""
    async with service.worker_runtime.engine.begin() as conn:
        await conn.execute(
            update(webhook_endpoints)
            .where(webhook_endpoints.c.id == from_public(IdPrefix.WEBHOOK_ENDPOINT, endpoint_id))
            .values(url=url)
        )


async def test_a_url_the_client_cannot_send_to_is_a_failed_attempt_retried_then_disabled(
    service: Service, tenant: Tenant, receiver: Receiver, webhook_jobs: WebhookJobs
) -> None:
    endpoint = await create_endpoint(tenant.client, receiver.url())
    await _break_url(service, endpoint["id"], "https://01.1.1.1/hook")

    tested = await tenant.client.post(f"/v1/webhooks/{endpoint['id']}/test")
    assert tested.status_code == 200, tested.text
    result = tested.json()
    assert (result["succeeded"], result["status_code"]) == (False, None)
    assert "01.1.1.1" in result["error"]

    message = await wait_until_final(
        tenant.client, await send(tenant.client, message_body(cascade=PUSH_ONLY))
    )
    log = await _wait_for_deliveries(
        tenant.client,
        endpoint["id"],
        lambda found: len(found) == len(message["events"]) and all(map(_attempted, found)),
    )
    assert {d["status"] for d in log} == {"pending"}
    assert all("01.1.1.1" in d["error"] and d["next_retry_at"] for d in log)

    # Five days of this later, the endpoint is given up on (each delivery as last listed:
    # the worker retrying one meanwhile leaves the others to the test).
    later = min(_at(d["last_attempt_at"]) for d in log) + timedelta(days=5, minutes=1)
    for delivery in await deliveries(tenant.client, endpoint["id"]):
        await webhook_jobs.deliver(delivery["id"], delivery["attempts"], later)
    state = (await tenant.client.get(f"/v1/webhooks/{endpoint['id']}")).json()
    assert state["enabled"] is False
    assert "01.1.1.1" in state["disabled_reason"]
    assert {d["status"] for d in await deliveries(tenant.client, endpoint["id"])} == {"failed"}
    assert receiver.received == []


async def test_the_delivery_log_pages_newest_first_with_a_cursor(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(tenant.client, receiver.url())
    receiver.secrets = [endpoint["secret"]]
    message = await wait_until_final(
        tenant.client, await send(tenant.client, message_body(cascade=PUSH_ONLY))
    )
    log = await _wait_for_deliveries(
        tenant.client, endpoint["id"], lambda found: len(found) == len(message["events"])
    )
    assert len(log) >= 3
    url = f"/v1/webhooks/{endpoint['id']}/deliveries"

    paged: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = (await tenant.client.get(url, params=params)).json()
        paged += [d["id"] for d in page["data"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert paged == [d["id"] for d in log]
    # The deprecated `before` still takes a delivery id, and the cursor itself.
    older = (await tenant.client.get(url, params={"before": log[0]["id"]})).json()
    assert [d["id"] for d in older["data"]] == paged[1:]
    first = (await tenant.client.get(url, params={"limit": 1})).json()
    via_before = (await tenant.client.get(url, params={"before": first["next_cursor"]})).json()
    # (ids only: a delivery still being attempted may change between the two reads)
    assert [d["id"] for d in via_before["data"]] == [d["id"] for d in older["data"]]
