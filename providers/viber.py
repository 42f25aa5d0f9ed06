"""Viber REST Bot API adapter: text messages to a bot's subscribers and their receipts.

Sends with `POST {base}/pa/send_message` (header `X-Viber-Auth-Token`). Viber answers
HTTP 200 for nearly everything and puts the outcome in the body's `status` (0 = ok,
with a `message_token`). Receipts arrive on the bot's one webhook as `delivered`,
`seen` and `failed` events keyed by `message_token`, signed with
`X-Viber-Content-Signature` = hex HMAC-SHA256(auth token, raw body).

Subscribers' messages arrive on the same webhook as `message` events (`sender.id`,
`message.type`/`text`, `message_token`, `timestamp` in ms): text ones are replies,
returned by `parse_callback` with the receipts, or alone by `parse_inbound`.

Viber echoes `tracking_data` (our attempt id) only on the user's replies, not on
receipts, so receipts match attempts by `message_token`. The API takes no idempotency
key: a send that timed out after Viber took it may be sent again by a retry. A user
who blocked or never subscribed to the bot gets no message and often no `failed`
event either: that case is the cascade's "no news, fall over after the timeout".
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from providers.base import (
    Accepted,
    CallbackContents,
    Channel,
    InboundMessage,
    InvalidSignature,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    ReceiptStatus,
    Recipient,
    Rejected,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)
from providers.http import json_object, retry_after_seconds, transport_error

AUTH_HEADER: Final = "X-Viber-Auth-Token"
SIGNATURE_HEADER: Final = "x-viber-content-signature"
SIGNATURE_QUERY_PARAMETER: Final = "sig"  # Viber's Node SDK also accepts the signature here
MAX_TEXT_CHARS: Final = 7000

# The REST Bot API's status codes (0 is ok), as named in Viber's documentation and SDKs.
STATUS_NAMES: Final[Mapping[int, str]] = {
    1: "invalidUrl",
    2: "invalidAuthToken",
    3: "badData",
    4: "missingData",
    5: "receiverNotRegistered",
    6: "receiverNotSubscribed",
    7: "publicAccountBlocked",
    8: "publicAccountNotFound",
    9: "publicAccountSuspended",
    10: "webhookNotSet",
    11: "receiverNoSuitableDevice",
    12: "tooManyRequests",
    13: "apiVersionNotSupported",
    14: "incompatibleWithVersion",
    15: "publicAccountNotAuthorized",
    16: "inchatReplyMessageNotAllowed",
    17: "publicAccountIsNotInline",
    18: "noPublicChat",
    19: "cannotSendBroadcast",
    20: "broadcastNotAllowed",
}
# The recipient cannot get this message through Viber: fall over now.
# (13: all the user's devices are older than the message needs; we set no min_api_version.)
_RECIPIENT_REJECTED: Final = frozenset({5, 6, 11, 13})
# This request can never succeed as sent (too long, malformed): retrying is pointless.
_REQUEST_REJECTED: Final = frozenset({3, 4, 14})
_THROTTLED: Final = frozenset({12})
# Everything else (2 token, 7-10 and 15+ account state, unknown codes) is our bot's
# configuration: transient and the provider's fault, so a circuit breaker sees it.

_RECEIPT_EVENTS: Final[Mapping[str, ReceiptStatus]] = {
    "delivered": ReceiptStatus.DELIVERED,
    "seen": ReceiptStatus.READ,
    "failed": ReceiptStatus.FAILED,
}


class ViberConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "viber"
    base_url: str = "https://chatapi.viber.com"
    auth_token: SecretStr
    sender_name: str = Field(min_length=1, max_length=28)  # Viber's limit for sender.name
    sender_avatar: str | None = None
    timeout_seconds: float = Field(default=10, gt=0)


class ViberProvider:
    channel: Channel = Channel.MESSENGER

    def __init__(self, config: ViberConfig, *, http: httpx2.AsyncClient | None = None) -> None:
        self.name = config.name
        self._config = config
        self._send_url = f"{config.base_url.rstrip('/')}/pa/send_message"
        self._owns_http = http is None
        self._http = http if http is not None else httpx2.AsyncClient()

    def address(self, to: Recipient) -> str | None:
        return to.viber_id

    async def send(self, message: OutboundMessage) -> SendResult:
        text = message.content.text
        if not text:
            return Rejected("viber:missing_text", "a Viber text message needs content.text")
        if len(text) > MAX_TEXT_CHARS:
            return Rejected("viber:text_too_long", f"at most {MAX_TEXT_CHARS} characters")
        try:
            response = await self._http.post(
                self._send_url,
                json=self._request_body(message, text),
                headers={AUTH_HEADER: self._config.auth_token.get_secret_value()},
                timeout=self._config.timeout_seconds,
            )
        except httpx2.TransportError as exc:
            raise transport_error("viber", exc) from exc
        return classify_response(response, fallback_id=message.attempt_id)

    def _request_body(self, message: OutboundMessage, text: str) -> dict[str, Any]:
        sender = {"name": self._config.sender_name}
        if self._config.sender_avatar:
            sender["avatar"] = self._config.sender_avatar
        return {
            "receiver": message.address,
            "type": "text",
            "text": text,
            "sender": sender,
            "tracking_data": message.attempt_id,
        }

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        return (await self.parse_callback(callback)).statuses

    async def parse_inbound(self, callback: ProviderCallback) -> list[InboundMessage]:
        return (await self.parse_callback(callback)).inbound

    async def parse_callback(self, callback: ProviderCallback) -> CallbackContents:
        """A receipt or a subscriber's text message: the bot has one webhook for both."""
        verify_signature(self._config.auth_token.get_secret_value(), callback)
        payload = _event(callback.body)
        if payload["event"] == "message":
            return CallbackContents(inbound=inbound_messages(payload))
        return CallbackContents(statuses=status_updates(payload))

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def classify_response(response: httpx2.Response, *, fallback_id: str) -> SendResult:
    http_status = response.status_code
    if http_status == 429 or http_status >= 500:
        raise TransientProviderError(
            f"viber:http_{http_status}",
            response.reason_phrase,
            retry_after=retry_after_seconds(response),
        )
    if http_status != 200:
        # Viber answers 200 even to a bad token: anything else is a wrong base URL or proxy.
        raise TransientProviderError(f"viber:http_{http_status}", response.reason_phrase)
    body = json_object(response)
    status = body.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        raise TransientProviderError("viber:bad_response", "200 without a numeric status")
    detail = str(body.get("status_message") or STATUS_NAMES.get(status, "unknown"))

    if status == 0:
        token = body.get("message_token")
        # Viber took the message: even without a token, sending again would duplicate it.
        return Accepted(str(token) if token is not None else fallback_id)
    code = f"viber:{STATUS_NAMES.get(status, status)}"
    if status in _RECIPIENT_REJECTED or status in _REQUEST_REJECTED:
        return Rejected(code, detail)
    if status in _THROTTLED:
        raise TransientProviderError(code, detail, retry_after=retry_after_seconds(response))
    raise TransientProviderError(code, detail)


def verify_signature(auth_token: str, callback: ProviderCallback) -> None:
    """Refuse a callback unless its signature is HMAC-SHA256(auth token, raw body) in hex."""
    headers = {key.lower(): value for key, value in callback.headers.items()}
    signature = headers.get(SIGNATURE_HEADER) or callback.query.get(SIGNATURE_QUERY_PARAMETER)
    if not signature:
        raise InvalidSignature(f"missing {SIGNATURE_HEADER}")
    expected = hmac.new(auth_token.encode(), callback.body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        raise InvalidSignature("X-Viber-Content-Signature does not match")


def _event(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise MalformedCallback("Viber callback is not JSON") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("event"), str):
        raise MalformedCallback("Viber callback without an event")
    return payload


def _message_token(payload: Mapping[str, Any]) -> str:
    token = payload.get("message_token")
    if isinstance(token, bool) or not (
        isinstance(token, int) or (isinstance(token, str) and token.isdigit())
    ):
        raise MalformedCallback(f"Viber {payload['event']} event without a message_token")
    # Tokens exceed 2**53: JSON numbers read as Python ints stay exact; keep them as text.
    return str(token)


def inbound_messages(payload: Mapping[str, Any]) -> list[InboundMessage]:
    """A `message` event's text (a subscriber's reply); [] for pictures, stickers, …"""
    sender, message = payload.get("sender"), payload.get("message")
    if not isinstance(sender, dict) or not isinstance(message, dict):
        return []
    sender_id, text = sender.get("id"), message.get("text")
    if message.get("type") != "text" or not isinstance(text, str):
        return []
    if not isinstance(sender_id, str) or not sender_id:
        raise MalformedCallback("Viber text message without sender.id")
    token = _message_token(payload)
    return [
        InboundMessage(
            channel=Channel.MESSENGER,
            sender=sender_id,
            text=text,
            event_id=token,
            sent_at=_event_time(payload.get("timestamp")),
        )
    ]


def status_updates(payload: Mapping[str, Any]) -> list[StatusUpdate]:
    """The receipt one verified webhook event carries; [] for other events."""
    event: str = payload["event"]
    status = _RECEIPT_EVENTS.get(event)
    if status is None:
        # subscribed, unsubscribed, conversation_started, webhook, ...
        return []

    message_token = _message_token(payload)
    failed = status is ReceiptStatus.FAILED
    desc = payload.get("desc")
    return [
        StatusUpdate(
            status=status,
            event_id=f"{message_token}:{event}",
            provider_message_id=message_token,
            error_code="viber:failed" if failed else None,
            error_detail=(str(desc) if desc else "Viber reported failed") if failed else None,
            occurred_at=_event_time(payload.get("timestamp")),
        )
    ]


def _event_time(timestamp: Any) -> datetime | None:
    """Viber timestamps are Unix milliseconds."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        return None
    try:
        return datetime.fromtimestamp(timestamp / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
