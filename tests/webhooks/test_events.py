"""The pure parts: event names, filters, the retry schedule, Standard Webhooks signatures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from app.webhooks.events import EventType, Subscription, event_type
from app.webhooks.retries import (
    DISABLE_AFTER,
    JITTER,
    RETRY_SCHEDULE,
    next_retry_delay,
    should_disable,
)
from app.webhooks.signing import new_secret, signed_headers


@pytest.mark.parametrize(
    ("status", "about_attempt", "expected"),
    [
        ("accepted", False, "message.accepted"),
        ("delivered", False, "message.delivered"),
        ("failed", False, "message.failed"),
        ("expired", False, "message.expired"),
        ("sending", True, "message.attempt.sending"),
        ("sent", True, "message.attempt.sent"),
        ("delivered", True, "message.attempt.delivered"),
        ("read", True, "message.read"),
        ("checked", True, "message.checked"),
        ("failed", True, "message.attempt.failed"),
        ("rejected", True, "message.attempt.failed"),
        ("expired", True, "message.attempt.failed"),
    ],
)
def test_ledger_events_map_to_webhook_types(
    status: str, about_attempt: bool, expected: str
) -> None:
    assert event_type(status, about_attempt) == expected
    assert expected in set(EventType)


def test_filters_are_all_when_null_and_exact_otherwise() -> None:
    everything = Subscription(None, None)
    narrow = Subscription({"message.delivered"}, {"service"})
    assert everything.wants("message.attempt.sent", "marketing")
    assert narrow.wants("message.delivered", "service")
    assert not narrow.wants("message.delivered", "transactional")
    assert not narrow.wants("message.failed", "service")


def test_the_schedule_is_immediate_then_5s_5m_30m_2h_5h_10h_10h() -> None:
    assert [d.total_seconds() for d in RETRY_SCHEDULE] == [
        0,
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
    ]


@given(failures=st.integers(min_value=1, max_value=20), rand=st.floats(0, 1, exclude_max=True))
def test_each_retry_waits_its_step_within_the_jitter(failures: int, rand: float) -> None:
    delay = next_retry_delay(failures, rand)
    if failures >= len(RETRY_SCHEDULE):
        assert delay is None
    else:
        assert delay is not None
        planned = RETRY_SCHEDULE[failures]
        assert planned * (1 - JITTER) <= delay <= planned * (1 + JITTER)


def test_an_endpoint_is_disabled_after_five_days_of_failures() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert not should_disable(None, start)
    assert not should_disable(start, start + DISABLE_AFTER - timedelta(seconds=1))
    assert should_disable(start, start + DISABLE_AFTER)


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    old, new = new_secret(), new_secret()
    body = '{"type":"message.delivered","timestamp":"2026-01-01T00:00:00Z","data":{}}'
    now = datetime.now(UTC)
    headers = signed_headers("evt_1", now, body, [new, old])

    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        assert Webhook(secret).verify(body, headers) == {
            "type": "message.delivered",
            "timestamp": "2026-01-01T00:00:00Z",
            "data": {},
        }
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body.replace("delivered", "failed"), headers)
