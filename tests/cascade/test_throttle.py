"""Per-account rate limits and circuit breakers, shared through the real Redis."""

from __future__ import annotations

import uuid

import pytest

from app.cascade.throttle import SendGuards
from providers.accounts import ProviderAccount
from tests.conftest import Service, Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final


def _account(**limits: float) -> ProviderAccount:
    return ProviderAccount(type="sandbox", name=f"acct-{uuid.uuid4().hex[:8]}", **limits)


async def test_rate_limit_allows_the_burst_then_spaces_sends(service: Service) -> None:
    guards = SendGuards(service.worker_runtime.redis)
    account = _account(rate_per_second=1, burst=3)

    waits = [(await guards.admit(account)).wait for _ in range(4)]

    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 0.0 < waits[3] <= 1.0


async def test_a_batch_takes_the_slots_the_rate_allows_in_one_call(service: Service) -> None:
    guards = SendGuards(service.worker_runtime.redis)
    limited, unlimited = _account(rate_per_second=1, burst=3), _account()

    batch = await guards.admit(limited, 5)
    after = await guards.admit(limited, 2)
    free = await guards.admit(unlimited, 500)

    assert batch.slots == 3
    assert 0.0 < batch.wait <= 1.0
    assert after.slots == 0
    assert (free.slots, free.wait) == (500, 0.0)


async def test_an_account_without_a_rate_is_never_limited(service: Service) -> None:
    guards = SendGuards(service.worker_runtime.redis)
    account = _account()
    assert [(await guards.admit(account)).wait for _ in range(50)] == [0.0] * 50


async def test_breaker_opens_at_the_threshold_once_failures_are_half_the_answers(
    service: Service,
) -> None:
    guards = SendGuards(service.worker_runtime.redis)
    account = _account(breaker_threshold=3)  # and the default ratio, 0.5

    assert not await guards.record_outcomes(account, failures=2, successes=0)
    assert not await guards.record_outcomes(account, failures=0, successes=10)
    # 5 failures of 15 answers: over the threshold, under half.
    assert not await guards.record_outcomes(account, failures=3, successes=0)
    assert not await guards.circuit_open(account)
    # 10 of 20.
    assert await guards.record_outcomes(account, failures=5, successes=0)
    assert await guards.circuit_open(account)


async def test_a_busy_accounts_occasional_timeouts_never_open_its_circuit(
    service: Service,
) -> None:
    """Five timeouts within one batch of 64 that the provider otherwise answered opened the
    circuit of a count-only breaker and sent thousands of SMS over to email."""
    guards = SendGuards(service.worker_runtime.redis)
    account = _account(breaker_threshold=5)

    opened = [await guards.record_outcomes(account, failures=5, successes=59) for _ in range(20)]

    assert not any(opened)
    assert not await guards.circuit_open(account)


@pytest.mark.parametrize("phone", ["+48600100500"])
async def test_a_failing_provider_is_skipped_once_its_circuit_opens(
    tenant: Tenant, service: Service, phone: str
) -> None:
    # twilio-fragile opens its circuit after 2 provider errors (Twilio answers 500 here).
    guards = SendGuards(service.worker_runtime.redis)
    account = service.worker_runtime.providers.account("twilio-fragile")
    for _ in range(account.breaker_threshold):
        await guards.record_outcomes(account, failures=1, successes=0)
    body = message_body(
        to={"phone": phone, "email": "ann+circuit@example.com"},
        cascade=[
            {"channel": "sms", "provider": "twilio-fragile", "timeout": 60},
            {"channel": "email", "provider": "smtp", "timeout": 3},
        ],
    )

    message = await wait_until_final(tenant.client, await send(tenant.client, body), within=10)

    assert attempt_statuses(message) == [("sms", "rejected"), ("email", "sent")]
    assert message["attempts"][0]["error"]["code"] == "circuit_open"


async def test_a_rate_limited_send_waits_and_shows_why(tenant: Tenant) -> None:
    # sandbox-slow allows one send every 2 s: the second message waits its turn.
    body = message_body(
        to={"phone": "+48600100200"},
        cascade=[{"channel": "sms", "provider": "sandbox-slow", "timeout": 30}],
    )
    first = await send(tenant.client, body)
    second = await send(tenant.client, body)

    messages = [await wait_until_final(tenant.client, m, within=15) for m in (first, second)]

    assert [m["status"] for m in messages] == ["delivered", "delivered"]
    errors = [m["attempts"][0]["error"] for m in messages]
    assert {"code": "rate_limited", "detail": "sandbox-slow allows 0.5/s"} in errors


async def test_admit_checks_the_circuit_takes_a_rate_slot_and_counts_failures(
    service: Service,
) -> None:
    guards = SendGuards(service.worker_runtime.redis)
    account = _account(rate_per_second=1, burst=2, breaker_threshold=3)

    first = await guards.admit(account)
    await guards.record_outcomes(account, failures=1, successes=0)
    second = await guards.admit(account)
    limited = await guards.admit(account)
    await guards.record_outcomes(account, failures=1, successes=0)
    await guards.record_outcomes(account, failures=1, successes=0)
    tripped = await guards.admit(account)

    assert (first.circuit_open, first.wait, first.failures) == (False, 0.0, 0)
    assert (second.circuit_open, second.wait, second.failures) == (False, 0.0, 1)
    assert not limited.circuit_open and 0.0 < limited.wait <= 1.0
    assert tripped.circuit_open


async def test_admit_without_a_rate_never_waits(service: Service) -> None:
    guards = SendGuards(service.worker_runtime.redis)
    account = _account()
    admissions = [await guards.admit(account) for _ in range(20)]
    assert {(a.circuit_open, a.wait, a.failures) for a in admissions} == {(False, 0.0, 0)}
