"""Telegram through the running service: sends to a channel's `@username`, and replies to
the bot, which the simulator posts as Updates to the webhook setWebhook registered."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from app.policy.tables import inbound_replies
from providers.telegram import TelegramProvider
from tests.conftest import TELEGRAM_WEBHOOK_SECRET, Service, Simulators, Tenant
from tests.helpers import attempt_statuses, message_body, send, wait_until_final
from tests.simulators.telegram import TelegramSimulator


@pytest.fixture
async def telegram(service: Service, simulators: Simulators) -> AsyncIterator[TelegramSimulator]:
    """The simulator, with the service's update webhook set (what `set-webhook` does)."""
    adapter = service.api_runtime.providers.for_callbacks("telegram")
    assert isinstance(adapter, TelegramProvider)
    await adapter.set_webhook(f"{service.base_url}/v1/providers/telegram/inbound")
    yield simulators.telegram


def new_chat_id() -> int:
    # Ends in 11: never one of the simulator's failing endings (403, 400, 429, 502).
    return int(f"77{secrets.randbelow(10**6):06d}11")


def to_telegram(chat: str | int, category: str = "marketing") -> dict[str, Any]:
    return message_body(
        category=category,
        to={"telegram_chat_id": str(chat)},
        content={"text": f"News {secrets.token_hex(4)}"},
        cascade=[{"channel": "messenger", "provider": "telegram"}],
    )


async def outcome(tenant: Tenant, body: dict[str, Any]) -> str:
    return str((await wait_until_final(tenant.client, await send(tenant.client, body)))["status"])


async def stored_replies(service: Service, update: dict[str, Any]) -> list[tuple[str, str]]:
    async with service.api_runtime.engine.connect() as conn:
        rows = await conn.execute(
            select(inbound_replies.c.address, inbound_replies.c.keyword).where(
                inbound_replies.c.provider == "telegram",
                inbound_replies.c.event_id.startswith(f"{update['update_id']}:"),
            )
        )
    return [(row.address, row.keyword) for row in rows]


async def test_a_message_to_a_channel_username_goes_to_the_channel(
    tenant: Tenant, simulators: Simulators
) -> None:
    body = to_telegram("@cascade_news", category="transactional")

    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"
    assert attempt_statuses(message) == [("messenger", "sent")]
    assert message["attempts"][0]["provider_message_id"].startswith("@cascade_news:")
    [sent] = [
        r for r in simulators.telegram.requests if r.params.get("text") == body["content"]["text"]
    ]
    assert sent.params["chat_id"] == "@cascade_news"


@pytest.mark.parametrize(
    "chat_id", ["@abcd", "@" + "a" * 33, "@has-dash", "@@cascade_news", "cascade@news", "@"]
)
async def test_a_chat_id_telegram_would_refuse_is_refused_at_once(
    tenant: Tenant, chat_id: str
) -> None:
    response = await tenant.client.post("/v1/messages", json=to_telegram(chat_id))

    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "body.to.telegram_chat_id"


async def test_a_stop_sent_to_the_bot_suppresses_marketing_and_start_lifts_it(
    service: Service, tenant: Tenant, telegram: TelegramSimulator
) -> None:
    chat = new_chat_id()
    assert await outcome(tenant, to_telegram(chat)) == "delivered"

    stop_update, start_update = (
        telegram.text_update(chat, "STOP"),
        telegram.text_update(chat, "/start"),
    )

    stop = await telegram.deliver(stop_update)
    stopped = await outcome(tenant, to_telegram(chat))
    transactional = await outcome(tenant, to_telegram(chat, category="transactional"))
    start = await telegram.deliver(start_update)
    resumed = await outcome(tenant, to_telegram(chat))

    assert stop.status_code == 200
    assert stop.json() == {"received": 1, "applied": 1}
    assert stopped == "suppressed"
    assert transactional == "delivered"
    assert start.json() == {"received": 1, "applied": 1}
    assert resumed == "delivered"
    assert await stored_replies(service, stop_update) == [(str(chat), "stop")]
    assert await stored_replies(service, start_update) == [(str(chat), "start")]


@pytest.mark.parametrize("secret", [None, "not-the-secret", TELEGRAM_WEBHOOK_SECRET[:-1]])
async def test_an_update_without_the_right_secret_is_refused_and_changes_nothing(
    service: Service, tenant: Tenant, telegram: TelegramSimulator, secret: str | None
) -> None:
    chat = new_chat_id()
    assert await outcome(tenant, to_telegram(chat)) == "delivered"
    update = telegram.text_update(chat, "STOP")

    forged = await telegram.forge(update, secret)

    assert forged.status_code == 401
    problem = forged.json()
    assert problem["status"] == 401
    assert "X-Telegram-Bot-Api-Secret-Token" in problem["detail"]
    assert TELEGRAM_WEBHOOK_SECRET not in forged.response.decode()
    assert await stored_replies(service, update) == []
    assert await outcome(tenant, to_telegram(chat)) == "delivered"


async def test_a_redelivered_update_is_applied_once(
    service: Service, tenant: Tenant, telegram: TelegramSimulator
) -> None:
    chat = new_chat_id()
    assert await outcome(tenant, to_telegram(chat)) == "delivered"
    stop = telegram.text_update(chat, "stop")

    first = await telegram.deliver(stop)
    again = await telegram.deliver(stop)
    start = await telegram.deliver(telegram.text_update(chat, "START"))
    # Telegram resends an update it got no 2xx for: a late copy must not unsubscribe again.
    late = await telegram.deliver(stop)

    assert first.json() == {"received": 1, "applied": 1}
    assert again.json() == {"received": 1, "applied": 0}
    assert start.json() == {"received": 1, "applied": 1}
    assert late.json() == {"received": 1, "applied": 0}
    assert await stored_replies(service, stop) == [(str(chat), "stop")]
    assert await outcome(tenant, to_telegram(chat)) == "delivered"


async def test_updates_with_nothing_to_apply_are_answered_at_once(
    service: Service, tenant: Tenant, telegram: TelegramSimulator
) -> None:
    chat = new_chat_id()
    assert await outcome(tenant, to_telegram(chat)) == "delivered"
    sticker = telegram.update(
        "message",
        {
            "message_id": 1,
            "date": 1_700_000_000,
            "chat": {"id": chat, "type": "private", "first_name": "Sim"},
            "sticker": {"file_id": "CAACAgIAAx", "width": 512, "height": 512},
        },
    )
    chatter = telegram.text_update(chat, "stop by tomorrow?")

    answers = [await telegram.deliver(sticker), await telegram.deliver(chatter)]

    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json() for a in answers] == [
        {"received": 0, "applied": 0},
        {"received": 1, "applied": 0},
    ]
    assert await stored_replies(service, chatter) == []
    assert await outcome(tenant, to_telegram(chat)) == "delivered"


async def test_a_stop_posted_in_a_public_channel_suppresses_its_username(
    tenant: Tenant, telegram: TelegramSimulator
) -> None:
    username = f"Cascade_Promo_{secrets.token_hex(4)}"
    assert await outcome(tenant, to_telegram(f"@{username}")) == "delivered"
    post = telegram.text_update(
        -1001000000000,
        "STOP",
        kind="channel_post",
        chat_type="channel",
        username=username.lower(),
    )

    stop = await telegram.deliver(post)

    # Two replies (the numeric id and the @username), applied where marketing went.
    assert stop.json() == {"received": 2, "applied": 1}
    # Telegram ignores a username's case; so does the suppression.
    assert await outcome(tenant, to_telegram(f"@{username.upper()}")) == "suppressed"
    found = await tenant.client.get(
        "/v1/suppressions", params={"channel": "messenger", "address": f"@{username}"}
    )
    assert [(s["address"], s["source"]) for s in found.json()["data"]] == [
        (f"@{username.lower()}", "inbound")
    ]
