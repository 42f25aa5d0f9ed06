"""WhatsApp Business Cloud API adapter (Meta Graph API).

Sends through `POST {base}/{version}/{phone_number_id}/messages` and reads the
`messages` webhook's `statuses` (sent → delivered → read, or failed), signed with
`X-Hub-Signature-256`. The same webhook carries the users' messages (`messages[]`):
text ones are replies (`from` is the wa_id, digits of an E.164 number; `id` the wamid),
returned by `parse_callback` with the statuses, or alone by `parse_inbound`.

Our attempt id travels as `biz_opaque_callback_data`, which Cloud API echoes in every
status webhook, so callbacks match by attempt id even before the send response was
recorded.

Cloud API takes no idempotency key: a send that timed out may still have gone out,
so a transient retry after a transport error can duplicate a message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

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
    ReportedPrice,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)
from providers.http import retry_after_seconds, transport_error

SIGNATURE_HEADER: Final = "x-hub-signature-256"

# Error codes from Meta's Cloud API error reference, classified for the cascade.
# Anything not listed is permanent when the HTTP status is 4xx, transient when 5xx.
_THROTTLED: Final = frozenset({4, 80007, 130429, 131048})
_PROVIDER_DOWN: Final = frozenset({1, 2, 131000, 131016, 131057, 133004})
_RECIPIENT_THROTTLED: Final = frozenset({131056})  # (business, consumer) pair rate limit
# Our token, account, number or template is wrong: every send would fail the same way.
_MISCONFIGURED: Final = frozenset(
    {0, 3, 10, 33, 190, 368, 131005, 131031, 131042, 132001, 132015, 132016, 133010}
)
_PERMISSION_RANGE: Final = range(200, 300)

_STATUSES: Final = {
    "sent": ReceiptStatus.SENT,
    "delivered": ReceiptStatus.DELIVERED,
    "read": ReceiptStatus.READ,
    "failed": ReceiptStatus.FAILED,
}


class WhatsAppConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = "whatsapp"
    base_url: str = "https://graph.facebook.com"
    api_version: str = "v21.0"
    phone_number_id: str
    access_token: SecretStr
    app_secret: SecretStr
    verify_token: SecretStr
    # Business-initiated messages outside the 24 h window must be approved templates.
    template_name: str | None = None
    template_language: str = "en"
    timeout_seconds: float = 10


class _GraphError(BaseModel):
    code: int
    message: str = ""
    type: str | None = None
    error_subcode: int | None = None
    error_data: dict[str, Any] | None = None
    fbtrace_id: str | None = None

    @property
    def misconfigured(self) -> bool:
        # Code 100 with subcode 33: the phone number id does not exist or is not ours.
        return (
            self.code in _MISCONFIGURED
            or self.code in _PERMISSION_RANGE
            or (self.code == 100 and self.error_subcode == 33)
        )


class _GraphErrorBody(BaseModel):
    error: _GraphError


class _SentMessage(BaseModel):
    id: str = Field(min_length=1)


class _SendResponse(BaseModel):
    messages: list[_SentMessage] = Field(min_length=1)


class _StatusError(BaseModel):
    code: int
    title: str | None = None
    message: str | None = None
    error_data: dict[str, Any] | None = None


class _Pricing(BaseModel):
    # `billable` is deprecated under per-message pricing, where `type` says "free_…".
    billable: bool | None = None
    category: str | None = None
    type: str | None = None

    def reported(self) -> ReportedPrice:
        free = self.billable is False or (self.type or "").startswith("free")
        return ReportedPrice(billable=False if free else None, category=self.category)


class _Status(BaseModel):
    id: str = Field(min_length=1)
    status: str
    timestamp: int = Field(ge=0, le=253_402_300_799)  # up to year 9999
    recipient_id: str | None = None
    biz_opaque_callback_data: str | None = None
    errors: list[_StatusError] = []
    pricing: _Pricing | None = None


class _Text(BaseModel):
    body: str


class _UserMessage(BaseModel):
    from_: str = Field(alias="from", min_length=1)
    id: str = Field(min_length=1)
    timestamp: int = Field(ge=0, le=253_402_300_799)
    type: str
    text: _Text | None = None


class _Metadata(BaseModel):
    display_phone_number: str | None = None


class _ChangeValue(BaseModel):
    statuses: list[_Status] = []
    messages: list[_UserMessage] = []
    metadata: _Metadata | None = None


class _Change(BaseModel):
    field: str
    value: _ChangeValue


class _Entry(BaseModel):
    id: str
    changes: list[_Change]


class _Webhook(BaseModel):
    object: Literal["whatsapp_business_account"]
    entry: list[_Entry]


class WhatsAppProvider:
    """Messenger provider for WhatsApp Cloud API; `http` is borrowed, never closed, if given."""

    channel = Channel.MESSENGER

    def __init__(self, config: WhatsAppConfig, *, http: httpx2.AsyncClient | None = None) -> None:
        self.config = config
        self.name = config.name
        self._owns_http = http is None
        self._http = http or httpx2.AsyncClient(timeout=config.timeout_seconds)
        self._messages_url = (
            f"{config.base_url.rstrip('/')}/{config.api_version}/{config.phone_number_id}/messages"
        )

    def address(self, to: Recipient) -> str | None:
        return to.whatsapp

    async def send(self, message: OutboundMessage) -> SendResult:
        payload = self._payload(message)
        if isinstance(payload, Rejected):
            return payload
        try:
            response = await self._http.post(
                self._messages_url,
                json=payload,
                headers={"Authorization": f"Bearer {self.config.access_token.get_secret_value()}"},
                timeout=self.config.timeout_seconds,
            )
        except httpx2.TransportError as exc:
            raise transport_error("whatsapp", exc) from exc
        return _classify(response)

    def _payload(self, message: OutboundMessage) -> dict[str, Any] | Rejected:
        to = message.address.removeprefix("+")
        if not to.isdigit():
            return Rejected(_code("invalid_address"), "recipient is not an E.164 number")
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "biz_opaque_callback_data": message.attempt_id,
        }
        text = message.content.text
        content = message.content
        if content.template_name is not None:
            # A template chosen per message (rendered from a Cascade template's variant).
            template: dict[str, Any] = {
                "name": content.template_name,
                "language": {"code": content.template_language or self.config.template_language},
            }
            if content.template_params:
                template["components"] = [
                    {
                        "type": "body",
                        "parameters": [
                            {"type": "text", "text": p} for p in content.template_params
                        ],
                    }
                ]
            payload |= {"type": "template", "template": template}
        elif self.config.template_name is not None:
            template = {
                "name": self.config.template_name,
                "language": {"code": self.config.template_language},
            }
            if text:
                template["components"] = [
                    {"type": "body", "parameters": [{"type": "text", "text": text}]}
                ]
            payload |= {"type": "template", "template": template}
        elif text:
            payload |= {"type": "text", "text": {"body": text}}
        else:
            return Rejected(_code("empty_body"), "a text message needs content.text")
        return payload

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        return (await self.parse_callback(callback)).statuses

    async def parse_inbound(self, callback: ProviderCallback) -> list[InboundMessage]:
        return (await self.parse_callback(callback)).inbound

    async def parse_callback(self, callback: ProviderCallback) -> CallbackContents:
        """A `messages` webhook: its statuses, and the users' text messages (replies)."""
        self._verify_signature(callback)
        try:
            webhook = _Webhook.model_validate_json(callback.body)
        except ValidationError as exc:
            raise MalformedCallback(f"not a WhatsApp webhook: {exc.error_count()} errors") from exc
        values = [
            change.value
            for entry in webhook.entry
            for change in entry.changes
            if change.field == "messages"
        ]
        return CallbackContents(
            statuses=[
                _status_update(status)
                for value in values
                for status in value.statuses
                # Forward compatible: statuses we do not track (e.g. "deleted") are skipped.
                if status.status in _STATUSES
            ],
            inbound=[
                _inbound_message(message, value.metadata)
                for value in values
                for message in value.messages
                # Media, reactions, buttons, …: only text is kept as a reply.
                if message.type == "text" and message.text is not None
            ],
        )

    def _verify_signature(self, callback: ProviderCallback) -> None:
        header = _header(callback.headers, SIGNATURE_HEADER)
        if header is None or not header.startswith("sha256="):
            raise InvalidSignature(f"missing or malformed {SIGNATURE_HEADER}")
        expected = hmac.new(
            self.config.app_secret.get_secret_value().encode(), callback.body, hashlib.sha256
        ).hexdigest()
        given = header.removeprefix("sha256=").strip().lower()
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise InvalidSignature(f"{SIGNATURE_HEADER} does not match the body")

    def verify_subscription(self, query: Mapping[str, str]) -> str | None:
        """The `GET ?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…` handshake.

        Returns the challenge to echo (200, text/plain) or None to refuse (403).
        """
        token = query.get("hub.verify_token", "")
        challenge = query.get("hub.challenge")
        expected = self.config.verify_token.get_secret_value()
        if query.get("hub.mode") != "subscribe" or not challenge:
            return None
        if not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        return challenge

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def _classify(response: httpx2.Response) -> SendResult:
    if response.is_success:
        try:
            sent = _SendResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise TransientProviderError(
                _code("bad_response"), f"HTTP {response.status_code} without a message id"
            ) from exc
        return Accepted(sent.messages[0].id)

    retry_after = retry_after_seconds(response)
    try:
        error = _GraphErrorBody.model_validate_json(response.content).error
    except ValidationError:
        # Not Graph API JSON: a proxy, a load balancer or a wrong base_url answered.
        raise TransientProviderError(
            _code(f"http_{response.status_code}"),
            response.reason_phrase,
            retry_after=retry_after,
        ) from None

    code = _code(error.code)
    detail = _error_detail(error)
    if error.code in _RECIPIENT_THROTTLED:
        raise TransientProviderError(code, detail, retry_after=retry_after, provider_fault=False)
    if (
        error.code in _THROTTLED
        or error.code in _PROVIDER_DOWN
        or error.misconfigured
        or response.status_code in (401, 403, 429)
        or response.is_server_error
    ):
        raise TransientProviderError(code, detail, retry_after=retry_after)
    return Rejected(code, detail)


def _error_detail(error: _GraphError) -> str:
    details = (error.error_data or {}).get("details")
    return f"{error.message}: {details}" if isinstance(details, str) else error.message


def _code(code: int | str) -> str:
    """Our error code for a Cloud API one: sends and status webhooks alike."""
    return f"whatsapp:{code}"


def _status_update(status: _Status) -> StatusUpdate:
    error = status.errors[0] if status.errors else None
    code = None
    if error is not None:
        code = _code(error.code)
    elif _STATUSES[status.status] is ReceiptStatus.FAILED:
        code = _code("failed")  # a failure that gives no reason
    return StatusUpdate(
        status=_STATUSES[status.status],
        event_id=f"{status.id}:{status.status}",
        provider_message_id=status.id,
        attempt_id=status.biz_opaque_callback_data or None,
        error_code=code,
        error_detail=(error.message or error.title) if error else None,
        occurred_at=datetime.fromtimestamp(status.timestamp, tz=UTC),
        price=status.pricing.reported() if status.pricing is not None else None,
    )


def _inbound_message(message: _UserMessage, metadata: _Metadata | None) -> InboundMessage:
    assert message.text is not None
    ours = metadata.display_phone_number if metadata is not None else None
    return InboundMessage(
        channel=Channel.MESSENGER,
        sender=_e164(message.from_),
        text=message.text.body,
        event_id=message.id,
        sent_at=datetime.fromtimestamp(message.timestamp, tz=UTC),
        to=_e164(ours) if ours else None,
    )


def _e164(wa_id: str) -> str:
    """A wa_id or display number (digits, maybe formatted) as `+<digits>`."""
    return "+" + "".join(c for c in wa_id if c.isdigit())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None
