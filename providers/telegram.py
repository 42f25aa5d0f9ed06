"""Telegram Bot API adapter.

Telegram reports nothing after `sendMessage` succeeds: no delivery and no read
receipts. A Telegram step must therefore be configured with `success_on: accepted`;
with `delivered` it could only ever end by timing out.

The bot token is part of every request URL, so it must never reach logs: errors here
carry the exception type and Telegram's description, never the URL. (httpx2 itself
logs request URLs at INFO level; keep the `httpx2` logger at WARNING in production.)
"""

from __future__ import annotations

from typing import Any

import httpx2
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from providers.base import (
    Accepted,
    Channel,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    Recipient,
    Rejected,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)
from providers.http import retry_after_seconds


class TelegramConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = "telegram"
    base_url: str = "https://api.telegram.org"
    bot_token: SecretStr
    timeout_seconds: float = 10
    parse_mode: str | None = None  # "HTML", "MarkdownV2" or legacy "Markdown"


class _SentMessage(BaseModel):
    message_id: int


class _Success(BaseModel):
    ok: bool
    result: _SentMessage


class _ResponseParameters(BaseModel):
    retry_after: float | None = None
    migrate_to_chat_id: int | None = None


class _Failure(BaseModel):
    ok: bool
    error_code: int
    description: str = ""
    parameters: _ResponseParameters | None = None


class TelegramProvider:
    """Messenger provider for a Telegram bot; `http` is borrowed, never closed, if given.

    Success can only be `accepted` (see the module docstring).
    """

    channel = Channel.MESSENGER
    # No delivery receipts exist: a step's default success is the Bot API's acceptance.
    confirms_delivery = False

    def __init__(self, config: TelegramConfig, *, http: httpx2.AsyncClient | None = None) -> None:
        self.config = config
        self.name = config.name
        self._owns_http = http is None
        self._http = http or httpx2.AsyncClient(timeout=config.timeout_seconds)

    def address(self, to: Recipient) -> str | None:
        return to.telegram_chat_id

    async def send(self, message: OutboundMessage) -> SendResult:
        chat_id = message.address
        if not message.content.text:
            return Rejected("telegram:empty_text", "sendMessage needs content.text")
        payload: dict[str, Any] = {"chat_id": _chat_id(chat_id), "text": message.content.text}
        if self.config.parse_mode is not None:
            payload["parse_mode"] = self.config.parse_mode
        url = (
            f"{self.config.base_url.rstrip('/')}"
            f"/bot{self.config.bot_token.get_secret_value()}/sendMessage"
        )
        try:
            response = await self._http.post(url, json=payload, timeout=self.config.timeout_seconds)
        except httpx2.TransportError as exc:
            raise TransientProviderError("telegram:transport", type(exc).__name__) from None
        return _classify(response, chat_id)

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        """Always raises: Telegram has no status callbacks, so nothing posted here is one.

        Refusing (400) rather than answering `[]` keeps a misrouted bot webhook or a
        stranger's request visible instead of silently acknowledged.
        """
        raise MalformedCallback("telegram sends no status callbacks")

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def _chat_id(address: str) -> int | str:
    # Numeric ids go as integers; "@channelusername" stays a string.
    return int(address) if address.removeprefix("-").isdigit() else address


def _classify(response: httpx2.Response, chat_id: str) -> SendResult:
    status = response.status_code
    if response.is_success:
        try:
            sent = _Success.model_validate_json(response.content)
        except ValidationError:
            raise TransientProviderError(
                "telegram:bad_response", f"HTTP {status} without a message_id"
            ) from None
        return Accepted(f"{chat_id}:{sent.result.message_id}")

    try:
        failure = _Failure.model_validate_json(response.content)
    except ValidationError:
        failure = None
    code = failure.error_code if failure else status
    description = failure.description if failure else response.reason_phrase
    parameters = failure.parameters if failure else None

    if code == 429:
        retry_after = parameters.retry_after if parameters else None
        raise TransientProviderError(
            "telegram:429", description, retry_after=retry_after or retry_after_seconds(response)
        )
    if code in (401, 404):
        # 401: token revoked or wrong; 404: the token is malformed or the base URL is wrong.
        raise TransientProviderError(f"telegram:{code}", description)
    if status >= 500 or failure is None:
        raise TransientProviderError(f"telegram:{code}", description)
    if parameters is not None and parameters.migrate_to_chat_id is not None:
        # The group became a supergroup: the stored chat id must be replaced.
        description = f"{description} (migrate_to_chat_id={parameters.migrate_to_chat_id})"
    # 403: bot blocked, user deactivated, bot cannot initiate; 400: chat not found, bad text.
    return Rejected(f"telegram:{code}", description)
