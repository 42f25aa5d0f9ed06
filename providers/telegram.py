"""Telegram Bot API adapter.

Telegram reports nothing after `sendMessage` succeeds: no delivery and no read
receipts. A Telegram step must therefore be configured with `success_on: accepted`;
with `delivered` it could only ever end by timing out.

Replies come back as bot updates: `setWebhook` (see `set_webhook`, run by
`cascade providers telegram set-webhook`) points them at `/v1/providers/<account>/inbound`
with the account's `webhook_secret`, which Telegram echoes in
`X-Telegram-Bot-Api-Secret-Token` on every update; `parse_inbound` checks it in constant
time before reading the body. Telegram signs nothing else: the secret is the only proof.

The bot token is part of every request URL, so it must never reach logs: errors here
carry the exception type and Telegram's description, never the URL. (httpx2 itself
logs request URLs at INFO level; keep the `httpx2` logger at WARNING in production.)
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx2
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator

from providers.base import (
    Accepted,
    Channel,
    InboundMessage,
    InvalidSignature,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    ProviderError,
    Recipient,
    Rejected,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)
from providers.http import retry_after_seconds, transport_error

SECRET_HEADER = "x-telegram-bot-api-secret-token"
# The update types `parse_inbound` reads; `set_webhook` asks Telegram for these only.
ALLOWED_UPDATES = ("message", "edited_message", "channel_post")
# setWebhook's rule for `secret_token`.
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
# "/stop", "/start <deep-link payload>", "/stop@some_bot" (a command picked in a group).
_COMMAND = re.compile(r"/([A-Za-z0-9_]{1,32})(?:@[A-Za-z0-9_]+)?(?:\s.*)?", re.DOTALL)


class TelegramConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = "telegram"
    base_url: str = "https://api.telegram.org"
    bot_token: SecretStr
    timeout_seconds: float = 10
    parse_mode: str | None = None  # "HTML", "MarkdownV2" or legacy "Markdown"
    # setWebhook's `secret_token`; without it every update is refused (401).
    webhook_secret: SecretStr | None = None

    @field_validator("webhook_secret")
    @classmethod
    def _secret_token_telegram_takes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _SECRET_TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("webhook_secret must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return value


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


class _WebhookSet(BaseModel):
    ok: bool
    result: bool
    description: str = ""


class _Chat(BaseModel):
    id: int
    type: str  # private, group, supergroup or channel
    username: str | None = None


class _Message(BaseModel):
    message_id: int
    chat: _Chat
    date: int
    edit_date: int | None = None
    text: str | None = None


class _Update(BaseModel):
    """The parts of an Update that `parse_inbound` reads; the other types are ignored."""

    update_id: int
    message: _Message | None = None
    edited_message: _Message | None = None
    channel_post: _Message | None = None


class TelegramApiError(ProviderError):
    """A Bot API call other than a send that did not succeed (e.g. setWebhook refused)."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"telegram:{code}: {description}")
        self.code = code
        self.description = description


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
        try:
            response = await self._http.post(
                self._method_url("sendMessage"), json=payload, timeout=self.config.timeout_seconds
            )
        except httpx2.TransportError as exc:
            raise transport_error("telegram", exc) from None
        return _classify(response, chat_id)

    def _method_url(self, method: str) -> str:
        token = self.config.bot_token.get_secret_value()
        return f"{self.config.base_url.rstrip('/')}/bot{token}/{method}"

    async def set_webhook(self, url: str, *, drop_pending_updates: bool = False) -> str:
        """Have Telegram post the bot's updates to `url` with the configured secret.

        Returns Telegram's description ("Webhook was set"); raises `TelegramApiError`
        when it refuses (e.g. not HTTPS) or cannot be reached, ValueError without a secret.
        """
        if self.config.webhook_secret is None:
            raise ValueError(f"provider {self.name!r} has no webhook_secret configured")
        payload = {
            "url": url,
            "secret_token": self.config.webhook_secret.get_secret_value(),
            "allowed_updates": list(ALLOWED_UPDATES),
            "drop_pending_updates": drop_pending_updates,
        }
        try:
            response = await self._http.post(
                self._method_url("setWebhook"), json=payload, timeout=self.config.timeout_seconds
            )
        except httpx2.TransportError as exc:
            raise TelegramApiError("transport", type(exc).__name__) from None
        try:
            if response.is_success:
                return _WebhookSet.model_validate_json(response.content).description
            failure = _Failure.model_validate_json(response.content)
        except ValidationError:
            raise TelegramApiError(str(response.status_code), response.reason_phrase) from None
        raise TelegramApiError(str(failure.error_code), failure.description)

    async def parse_inbound(self, callback: ProviderCallback) -> list[InboundMessage]:
        """The text messages a bot update carries, once its secret token is checked.

        Only `message`, `edited_message` and `channel_post` with text are read; any other
        update is answered with nothing to apply, so Telegram stops resending it.
        """
        self._verify_secret(callback.headers)
        try:
            update = _Update.model_validate_json(callback.body)
        except ValidationError as exc:
            raise MalformedCallback(f"not a Telegram Update: {exc.error_count()} errors") from None
        return inbound_messages(update)

    def _verify_secret(self, headers: Mapping[str, str]) -> None:
        if self.config.webhook_secret is None:
            raise InvalidSignature("no webhook_secret is configured for this bot")
        received = next((v for k, v in headers.items() if k.lower() == SECRET_HEADER), None)
        if received is None:
            raise InvalidSignature("X-Telegram-Bot-Api-Secret-Token is missing")
        expected = self.config.webhook_secret.get_secret_value().encode()
        if not hmac.compare_digest(received.encode(), expected):
            raise InvalidSignature("X-Telegram-Bot-Api-Secret-Token does not match")

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        """Always raises: Telegram has no status callbacks, so nothing posted here is one.

        Refusing (400) rather than answering `[]` keeps a misrouted bot webhook or a
        stranger's request visible instead of silently acknowledged.
        """
        raise MalformedCallback("telegram sends no status callbacks")

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def inbound_messages(update: _Update) -> list[InboundMessage]:
    """A text message as the reply of the chat it came from (where we send to that chat).

    The event id is the update id with the chat and message ids: a redelivered update is
    the same event, and a reused update id (after a week without updates Telegram picks
    the next one at random) is not taken for a replay. A public channel or supergroup is
    also addressed as `@username`, so its reply is given for that address too. A bot
    command is given as its name (`/stop@bot` is `stop`): Telegram's Start button sends
    `/start`.
    """
    message = update.message or update.edited_message or update.channel_post
    if message is None or message.text is None:
        return []
    chat = message.chat
    event_id = f"{update.update_id}:{chat.id}:{message.message_id}"
    sent_at = datetime.fromtimestamp(message.edit_date or message.date, UTC)
    command = _COMMAND.fullmatch(message.text.strip())
    text = command.group(1) if command else message.text
    found = [InboundMessage(Channel.MESSENGER, str(chat.id), text, event_id, sent_at)]
    if chat.username and chat.type in ("channel", "supergroup"):
        found.append(
            InboundMessage(Channel.MESSENGER, f"@{chat.username}", text, f"{event_id}:@", sent_at)
        )
    return found


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
