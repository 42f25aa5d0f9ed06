"""Telegram Bot API adapter, spoken to over real HTTP through the simulator."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner, Result

from app.cli import cli
from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    InboundMessage,
    InboundReceiver,
    InvalidSignature,
    MalformedCallback,
    OutboundMessage,
    Provider,
    ProviderCallback,
    Recipient,
    Rejected,
    TransientProviderError,
)
from providers.telegram import (
    ALLOWED_UPDATES,
    TelegramApiError,
    TelegramConfig,
    TelegramProvider,
)
from tests.simulators.telegram import SECRET_HEADER, TelegramSimulator, Webhook

SECRET = "bot-updates_secret-42"


@pytest.fixture(scope="module")
async def sim() -> AsyncIterator[TelegramSimulator]:
    async with TelegramSimulator() as sim:
        yield sim


def config_for(sim: TelegramSimulator, **overrides: object) -> TelegramConfig:
    values: dict[str, object] = {"base_url": sim.base_url, "bot_token": sim.bot_token}
    return TelegramConfig.model_validate(values | overrides)


@pytest.fixture
async def provider(sim: TelegramSimulator) -> AsyncIterator[TelegramProvider]:
    provider = TelegramProvider(config_for(sim, webhook_secret=SECRET))
    yield provider
    await provider.aclose()


def outbound(chat_id: str, text: str | None = "Your code is 123456") -> OutboundMessage:
    return OutboundMessage(
        message_id=f"msg_{uuid.uuid4().hex}",
        attempt_id=f"att_{uuid.uuid4().hex}",
        category=Category.TRANSACTIONAL,
        channel=Channel.MESSENGER,
        address=chat_id,
        content=Content(text=text),
        timeout_seconds=60,
    )


def test_the_provider_is_a_messenger_provider(provider: TelegramProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.name == "telegram"
    assert provider.channel is Channel.MESSENGER


def test_the_address_is_the_recipients_chat_id(provider: TelegramProvider) -> None:
    assert provider.address(Recipient(telegram_chat_id="987654321")) == "987654321"
    assert provider.address(Recipient(phone="+4915112345678")) is None


async def test_a_message_is_accepted_as_chat_and_message_id(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    first = await provider.send(outbound("987654321", "Hello from Cascade"))
    second = await provider.send(outbound("987654321"))

    assert isinstance(first, Accepted)
    assert isinstance(second, Accepted)
    chat, _, message_id = first.provider_message_id.partition(":")
    assert chat == "987654321"
    assert message_id.isdigit()
    assert second.provider_message_id != first.provider_message_id
    request = sim.requests[-2]
    assert request.method == "POST"
    assert request.path == f"/bot{sim.bot_token}/sendMessage"
    assert request.params == {"chat_id": 987654321, "text": "Hello from Cascade"}


async def test_a_channel_username_is_sent_as_a_string(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    result = await provider.send(outbound("@cascade_news"))

    assert isinstance(result, Accepted)
    assert result.provider_message_id.startswith("@cascade_news:")
    assert sim.requests[-1].params["chat_id"] == "@cascade_news"


async def test_a_configured_parse_mode_is_sent(sim: TelegramSimulator) -> None:
    provider = TelegramProvider(config_for(sim, parse_mode="HTML"))

    result = await provider.send(outbound("-1001234567890", "<b>123456</b>"))
    await provider.aclose()

    assert isinstance(result, Accepted)
    assert sim.requests[-1].params == {
        "chat_id": -1001234567890,
        "text": "<b>123456</b>",
        "parse_mode": "HTML",
    }


async def test_a_message_without_text_is_rejected_before_calling_the_api(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    before = len(sim.requests)

    result = await provider.send(outbound("987654321", text=None))

    assert result == Rejected("telegram:empty_text", "sendMessage needs content.text")
    assert len(sim.requests) == before


async def test_a_bot_blocked_by_the_user_is_a_permanent_rejection(
    provider: TelegramProvider,
) -> None:
    result = await provider.send(outbound("100403"))

    assert result == Rejected("telegram:403", "Forbidden: bot was blocked by the user")


async def test_an_unknown_chat_is_a_permanent_rejection(provider: TelegramProvider) -> None:
    result = await provider.send(outbound("100400"))

    assert result == Rejected("telegram:400", "Bad Request: chat not found")


async def test_a_text_telegram_refuses_is_a_permanent_rejection(
    provider: TelegramProvider,
) -> None:
    result = await provider.send(outbound("987654321", "x" * 4097))

    assert result == Rejected("telegram:400", "Bad Request: message is too long")


async def test_flood_control_is_transient_and_honours_retry_after(
    provider: TelegramProvider,
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("100429"))

    assert raised.value.code == "telegram:429"
    assert raised.value.retry_after == 1


async def test_a_bad_gateway_is_transient(provider: TelegramProvider) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("100502"))

    assert raised.value.code == "telegram:502"
    assert raised.value.provider_fault is True


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("123456789:revoked-token", "telegram:401"),  # well formed, not ours
        ("not-a-token", "telegram:404"),  # malformed: Telegram answers Not Found
    ],
)
async def test_a_bad_bot_token_is_a_transient_provider_fault(
    sim: TelegramSimulator, token: str, code: str
) -> None:
    provider = TelegramProvider(config_for(sim, bot_token=token))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("987654321"))
    await provider.aclose()

    assert raised.value.code == code
    assert raised.value.provider_fault is True
    assert token not in str(raised.value)


async def test_an_unreachable_api_is_transient(sim: TelegramSimulator) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    provider = TelegramProvider(config_for(sim, base_url=f"http://127.0.0.1:{closed_port}"))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("987654321"))
    await provider.aclose()

    assert raised.value.code == "telegram:transport"
    assert sim.bot_token not in str(raised.value)


async def test_there_are_no_status_callbacks_to_parse(provider: TelegramProvider) -> None:
    callback = ProviderCallback(
        "POST", "http://127.0.0.1/callbacks/telegram", {}, b'{"update_id": 1}'
    )

    with pytest.raises(MalformedCallback, match="no status callbacks"):
        await provider.parse_status(callback)


# --- updates: replies sent to the bot ------------------------------------------------


def update_callback(update: dict[str, Any], secret: str | None = SECRET) -> ProviderCallback:
    headers = {"content-type": "application/json"}
    if secret is not None:
        headers[SECRET_HEADER] = secret
    return ProviderCallback(
        "POST",
        "https://cascade.example/v1/providers/telegram/inbound",
        headers,
        orjson.dumps(update),
    )


def test_the_provider_takes_inbound_updates(provider: TelegramProvider) -> None:
    assert isinstance(provider, InboundReceiver)


async def test_a_private_message_is_the_chats_reply(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    update = sim.text_update(987654321, "STOP")

    [reply] = await provider.parse_inbound(update_callback(update))

    message = update["message"]
    assert reply == InboundMessage(
        channel=Channel.MESSENGER,
        sender="987654321",
        text="STOP",
        event_id=f"{update['update_id']}:987654321:{message['message_id']}",
        sent_at=datetime.fromtimestamp(message["date"], UTC),
    )


async def test_a_redelivered_update_is_the_same_event(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    update = sim.text_update(987654321, "STOP")

    first = await provider.parse_inbound(update_callback(update))
    again = await provider.parse_inbound(update_callback(update))
    other = await provider.parse_inbound(update_callback(sim.text_update(987654321, "STOP")))

    assert first == again
    assert other[0].event_id != first[0].event_id


@pytest.mark.parametrize(
    ("text", "given"),
    [
        ("/stop", "stop"),
        ("/start", "start"),  # what Telegram's Start button sends
        ("/start promo-42", "start"),  # a deep link's payload
        ("/stop@cascade_sim_bot", "stop"),  # picked from a group's command menu
        ("stop please", "stop please"),
        ("/ stop", "/ stop"),
    ],
)
async def test_a_bot_command_is_given_as_its_name(
    provider: TelegramProvider, sim: TelegramSimulator, text: str, given: str
) -> None:
    [reply] = await provider.parse_inbound(update_callback(sim.text_update(42, text)))

    assert reply.text == given


async def test_an_edited_message_counts_from_its_edit(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    update = sim.text_update(42, "STOP", kind="edited_message", edited=True)

    [reply] = await provider.parse_inbound(update_callback(update))

    edited = update["edited_message"]
    assert reply.sent_at == datetime.fromtimestamp(edited["edit_date"], UTC)
    assert edited["edit_date"] > edited["date"]


async def test_a_public_channels_post_is_also_its_usernames_reply(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    update = sim.text_update(
        -1001000000000, "STOP", kind="channel_post", chat_type="channel", username="Cascade_News"
    )

    replies = await provider.parse_inbound(update_callback(update))

    assert [(r.sender, r.text) for r in replies] == [
        ("-1001000000000", "STOP"),
        ("@Cascade_News", "STOP"),
    ]
    assert len({r.event_id for r in replies}) == 2


@pytest.mark.parametrize(
    "update",
    [
        {
            "update_id": 1,
            "message": {
                "message_id": 1,
                "date": 1,
                "chat": {"id": 1, "type": "private"},
                "sticker": {},
            },
        },
        {"update_id": 2, "my_chat_member": {"chat": {"id": 1, "type": "private"}}},
        {"update_id": 3, "callback_query": {"id": "1", "data": "stop"}},
    ],
)
async def test_updates_without_text_carry_nothing(
    provider: TelegramProvider, update: dict[str, Any]
) -> None:
    assert await provider.parse_inbound(update_callback(update)) == []


@pytest.mark.parametrize("secret", [None, "", "not-the-secret", SECRET + "x", SECRET[:-1]])
async def test_an_update_without_the_secret_token_is_refused(
    provider: TelegramProvider, sim: TelegramSimulator, secret: str | None
) -> None:
    with pytest.raises(InvalidSignature, match="X-Telegram-Bot-Api-Secret-Token"):
        await provider.parse_inbound(update_callback(sim.text_update(42, "STOP"), secret))


async def test_a_bot_without_a_webhook_secret_refuses_every_update(
    sim: TelegramSimulator,
) -> None:
    provider = TelegramProvider(config_for(sim))

    with pytest.raises(InvalidSignature, match="no webhook_secret"):
        await provider.parse_inbound(update_callback(sim.text_update(42, "STOP")))
    await provider.aclose()


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"message": {}}', b'{"update_id": "x"}'])
async def test_a_body_that_is_no_update_is_malformed(
    provider: TelegramProvider, body: bytes
) -> None:
    callback = ProviderCallback("POST", "https://x/", {SECRET_HEADER: SECRET}, body)

    with pytest.raises(MalformedCallback):
        await provider.parse_inbound(callback)


@pytest.mark.parametrize("secret", ["", "has space", "semi;colon", "x" * 257])
def test_a_webhook_secret_telegram_would_refuse_is_a_configuration_error(secret: str) -> None:
    with pytest.raises(ValidationError, match="webhook_secret"):
        TelegramConfig.model_validate({"bot_token": "1:x", "webhook_secret": secret})


async def test_set_webhook_registers_the_url_secret_and_update_types(
    provider: TelegramProvider, sim: TelegramSimulator
) -> None:
    url = "https://cascade.example/v1/providers/telegram/inbound"

    described = await provider.set_webhook(url)
    again = await provider.set_webhook(url)

    assert described == "Webhook was set"
    assert again == "Webhook is already set"
    assert sim.webhook == Webhook(url, SECRET, ALLOWED_UPDATES)
    request = sim.requests[-1]
    assert request.path == f"/bot{sim.bot_token}/setWebhook"
    assert request.params == {
        "url": url,
        "secret_token": SECRET,
        "allowed_updates": ["message", "edited_message", "channel_post"],
        "drop_pending_updates": False,
    }


@pytest.mark.parametrize(
    ("url", "description"),
    [
        ("http://cascade.example/hook", "An HTTPS URL must be provided for webhook"),
        ("https://cascade.example:8000/hook", "only on ports 80, 88, 443 or 8443"),
    ],
)
async def test_a_webhook_telegram_cannot_reach_is_refused_with_its_reason(
    provider: TelegramProvider, url: str, description: str
) -> None:
    with pytest.raises(TelegramApiError, match=description) as raised:
        await provider.set_webhook(url)

    assert raised.value.code == "400"


async def test_set_webhook_needs_a_secret_and_a_valid_token(sim: TelegramSimulator) -> None:
    no_secret = TelegramProvider(config_for(sim))
    revoked = TelegramProvider(
        config_for(sim, bot_token="123456789:revoked-token", webhook_secret=SECRET)
    )

    with pytest.raises(ValueError, match="no webhook_secret"):
        await no_secret.set_webhook("https://cascade.example/hook")
    with pytest.raises(TelegramApiError) as raised:
        await revoked.set_webhook("https://cascade.example/hook")
    await no_secret.aclose()
    await revoked.aclose()

    assert raised.value.code == "401"
    assert "revoked-token" not in str(raised.value)


# --- `cascade providers telegram set-webhook` ------------------------------------------


def bot_account(sim: TelegramSimulator, name: str, **config: object) -> dict[str, object]:
    values = {"base_url": sim.base_url, "bot_token": sim.bot_token, "webhook_secret": SECRET}
    return {"type": "telegram", "name": name, "config": values | config}


async def set_webhook_command(
    accounts: list[dict[str, object]], *args: str, public_url: str = "https://cascade.example"
) -> Result:
    env = {
        "CASCADE_PROVIDERS": json.dumps(accounts),
        "CASCADE_PUBLIC_URL": public_url,
        "COLUMNS": "200",
    }
    argv = ["providers", "telegram", "set-webhook", *args]
    # In a thread: the command runs its own event loop while the simulator serves in ours.
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, env=env)


async def test_set_webhook_points_the_bot_at_the_inbound_route(sim: TelegramSimulator) -> None:
    result = await set_webhook_command([bot_account(sim, "news-bot")])

    url = "https://cascade.example/v1/providers/news-bot/inbound"
    assert result.exit_code == 0, result.output
    assert sim.webhook == Webhook(url, SECRET, ALLOWED_UPDATES)
    assert f"Webhook was set: {url}" in result.output
    assert "updates: message, edited_message, channel_post" in result.output
    assert sim.bot_token not in result.output
    assert SECRET not in result.output


async def test_set_webhook_picks_the_named_account_and_public_url(sim: TelegramSimulator) -> None:
    accounts = [bot_account(sim, "bot-a"), bot_account(sim, "bot-b")]

    ambiguous = await set_webhook_command(accounts)
    unknown = await set_webhook_command(accounts, "--account", "bot-c")
    chosen = await set_webhook_command(
        accounts,
        "--account",
        "bot-b",
        "--public-url",
        "https://tunnel.example:8443/",
        "--drop-pending-updates",
    )

    assert ambiguous.exit_code == 1
    assert "pass --account (telegram accounts: bot-a, bot-b)" in ambiguous.output
    assert unknown.exit_code == 1
    assert "no telegram account 'bot-c'" in unknown.output
    assert chosen.exit_code == 0, chosen.output
    assert sim.webhook is not None
    assert sim.webhook.url == "https://tunnel.example:8443/v1/providers/bot-b/inbound"
    assert sim.requests[-1].params["drop_pending_updates"] is True


async def test_set_webhook_shows_why_telegram_refused(sim: TelegramSimulator) -> None:
    before = sim.webhook

    plain_http = await set_webhook_command(
        [bot_account(sim, "news-bot")], public_url="http://cascade.example"
    )
    no_secret = await set_webhook_command(
        [{"type": "telegram", "name": "news-bot", "config": {"bot_token": sim.bot_token}}]
    )
    bad_secret = await set_webhook_command([bot_account(sim, "news-bot", webhook_secret="a b")])

    assert plain_http.exit_code == 1
    assert "Telegram refused: telegram:400: Bad Request: bad webhook: An HTTPS URL" in (
        plain_http.output
    )
    assert no_secret.exit_code == 1
    assert "account 'news-bot' has no webhook_secret" in no_secret.output
    assert bad_secret.exit_code == 1
    assert "webhook_secret must be 1-256 characters" in bad_secret.output
    assert sim.webhook == before
