"""What sends cost: priced per attempt when accepted, summed per message and in the stats."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from providers.accounts import ConfigurationError, ProviderAccount, check_currencies
from providers.base import Channel, ReportedPrice
from providers.pricing import Price
from tests.conftest import Tenant
from tests.helpers import message_body, send, wait_until_final

# 200 GSM-7 characters: two segments (153 + 47).
LONG_TEXT = "x" * 200


async def stats(tenant: Tenant) -> dict[str, Any]:
    now = datetime.now(UTC)
    params = {"from": (now - timedelta(hours=1)).isoformat(), "to": now.isoformat()}
    response = await tenant.client.get("/v1/stats", params={**params, "bucket": "minute"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_delivered_sms_costs_its_segments_at_its_prefix_price(tenant: Tenant) -> None:
    body = message_body(
        to={"phone": "+15005550100"}, content={"text": LONG_TEXT}, cascade=[{"channel": "sms"}]
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"
    (attempt,) = message["attempts"]
    # The sandbox prices +1 at 0.0079 EUR a segment.
    assert (attempt["cost"], attempt["currency"]) == ("0.0158", "EUR")
    assert (message["cost"], message["currency"]) == ("0.0158", "EUR")


async def test_a_push_that_fails_over_to_sms_costs_both(tenant: Tenant) -> None:
    body = message_body(
        to={"push_token": "device-fail", "phone": "+48600100200"},
        cascade=[{"channel": "push"}, {"channel": "sms"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["delivered_channel"] == "sms"
    assert [a["cost"] for a in message["attempts"]] == ["0.0001", "0.0310"]
    assert Decimal(message["cost"]) == Decimal("0.0311")


async def test_a_rejected_send_costs_nothing(tenant: Tenant) -> None:
    body = message_body(
        to={"push_token": "device-reject", "phone": "+48600100200"},
        cascade=[{"channel": "push"}, {"channel": "sms"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert [a["cost"] for a in message["attempts"]] == [None, "0.0310"]
    assert message["cost"] == "0.0310"


async def test_a_whatsapp_receipts_pricing_replaces_the_estimate(tenant: Tenant) -> None:
    body = message_body(
        to={"whatsapp": "+48600100231"}, cascade=[{"channel": "messenger", "provider": "whatsapp"}]
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"
    # Estimated at the account's 0.05 per message; the receipts say `utility`: 0.0085.
    assert message["attempts"][0]["cost"] == "0.0085"
    assert message["cost"] == "0.0085"


async def test_an_account_without_a_price_costs_null_and_the_stats_say_so(
    tenant: Tenant,
) -> None:
    body = message_body(
        category="service",
        to={"phone": "+15005550006"},
        cascade=[{"channel": "sms", "provider": "twilio"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"
    assert message["attempts"][0]["cost"] is None
    assert message["cost"] is None
    body = await stats(tenant)
    (service,) = [c for c in body["by_category"] if c["category"] == "service"]
    assert service["cost"] is None and service["unpriced"] == 1
    assert body["unpriced"] == 1


async def test_stats_spend_and_savings_add_up_to_the_messages(tenant: Tenant) -> None:
    bodies = [
        # Delivered on push: its last step (SMS to +48) would have cost 0.031.
        message_body(
            to={"push_token": "device-ok", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
        # Fell over: paid the push and the SMS, 0.0001 more than the SMS alone.
        message_body(
            to={"push_token": "device-fail", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
        # Failed: it costs, and saves nothing.
        message_body(
            category="marketing", to={"phone": "+48600100202"}, cascade=[{"channel": "sms"}]
        ),
    ]
    messages = [
        await wait_until_final(tenant.client, await send(tenant.client, body)) for body in bodies
    ]

    body = await stats(tenant)

    assert body["currency"] == "EUR"
    assert Decimal(body["cost"]) == sum(Decimal(m["cost"]) for m in messages)
    assert Decimal(body["cost"]) == Decimal("0.0622")
    assert Decimal(body["saved"]) == Decimal("0.0309") - Decimal("0.0001")
    by_channel = {(c["category"], c["channel"]): c for c in body["by_channel"]}
    push = by_channel[("transactional", "push")]
    assert (push["cost"], push["saved"], push["delivery_rate"]) == ("0.0001", "0.0309", 1.0)
    sms = by_channel[("transactional", "sms")]
    assert (sms["cost"], sms["saved"], sms["fell_over"]) == ("0.0311", "-0.0001", 1.0)
    assert sms["cost_per_delivered"] == "0.0311"
    marketing = by_channel[("marketing", "sms")]
    assert (marketing["delivery_rate"], marketing["saved"]) == (0.0, None)
    assert marketing["cost"] == "0.0310" and marketing["cost_per_delivered"] is None


def test_prices_are_exact_decimals_and_floats_are_refused() -> None:
    price = Price.model_validate(
        {"currency": "EUR", "per_segment": "0.1", "prefixes": {"+4": "0.2", "+48": "0.031"}}
    )
    assert price.estimate(Channel.SMS, "+48600100200", 3) == Decimal("0.093")
    assert price.estimate(Channel.SMS, "+44700900000", 3) == Decimal("0.6")
    assert price.estimate(Channel.SMS, "+15005550006", 3) == Decimal("0.3")
    assert price.estimate(Channel.PUSH, "token", None) == Decimal("0.1")
    with pytest.raises(ValidationError, match="strings"):
        Price.model_validate({"currency": "EUR", "per_message": 0.1})
    only_prefixes = Price.model_validate({"currency": "EUR", "prefixes": {"+48": "0.03"}})
    assert only_prefixes.estimate(Channel.SMS, "+15005550006", 1) is None


def test_reported_prices_replace_the_estimate() -> None:
    price = Price.model_validate(
        {"currency": "EUR", "per_message": "0.05", "pricing_categories": {"utility": "0.0085"}}
    )
    estimate = Decimal("0.05")
    utility = ReportedPrice(category="utility")
    assert price.reported(Channel.MESSENGER, utility, estimate) == Decimal("0.0085")
    free = ReportedPrice(billable=False, category="service")
    assert price.reported(Channel.MESSENGER, free, estimate) == 0
    unknown = ReportedPrice(category="authentication_international")
    assert price.reported(Channel.MESSENGER, unknown, estimate) == estimate
    usd = ReportedPrice(amount=Decimal("0.01"), currency="USD")
    assert price.reported(Channel.MESSENGER, usd, estimate) == estimate
    eur = ReportedPrice(amount=Decimal("0.01"), currency="EUR")
    assert price.reported(Channel.MESSENGER, eur, estimate) == Decimal("0.01")


def test_accounts_pricing_in_two_currencies_are_refused() -> None:
    accounts = [
        ProviderAccount.model_validate(
            {"type": "sandbox", "name": name, "price": {"currency": currency}}
        )
        for name, currency in (("a", "EUR"), ("b", "USD"))
    ]
    with pytest.raises(ConfigurationError, match="one currency"):
        check_currencies(accounts)
    assert check_currencies(accounts[:1]) == "EUR"
