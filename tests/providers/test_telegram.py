"""Telegram Bot API adapter, spoken to over real HTTP through the simulator."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    MalformedCallback,
    OutboundMessage,
    Provider,
    ProviderCallback,
    Recipient,
    Rejected,
    TransientProviderError,
)
from providers.telegram import TelegramConfig, TelegramProvider
from tests.simulators.telegram import TelegramSimulator


@pytest.fixture(scope="module")
async def sim() -> AsyncIterator[TelegramSimulator]:
    async with TelegramSimulator() as sim:
        yield sim


def config_for(sim: TelegramSimulator, **overrides: object) -> TelegramConfig:
    values: dict[str, object] = {"base_url": sim.base_url, "bot_token": sim.bot_token}
    return TelegramConfig.model_validate(values | overrides)


@pytest.fixture
async def provider(sim: TelegramSimulator) -> AsyncIterator[TelegramProvider]:
    provider = TelegramProvider(config_for(sim))
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
