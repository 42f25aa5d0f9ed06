"""The one interface every provider adapter implements.

An adapter turns an `OutboundMessage` into the provider's wire request and classifies
the answer: `Accepted`, `Rejected` (permanent: fall over now) or raises
`TransientProviderError` (retry inside the step window). Status callbacks come back
through `parse_status`, which verifies the provider's own signature on the raw bytes
before it reads anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class Channel(StrEnum):
    PUSH = "push"
    MESSENGER = "messenger"
    SMS = "sms"
    EMAIL = "email"


class Category(StrEnum):
    TRANSACTIONAL = "transactional"
    SERVICE = "service"
    MARKETING = "marketing"


class ReceiptStatus(StrEnum):
    """What a provider can tell us about one attempt after the send."""

    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class WebPushSubscription:
    """A browser's PushSubscription (RFC 8030 endpoint + RFC 8291 keys, base64url)."""

    endpoint: str
    p256dh: str
    auth: str


@dataclass(frozen=True, slots=True)
class Recipient:
    push_token: str | None = None
    phone: str | None = None
    email: str | None = None
    whatsapp: str | None = None
    telegram_chat_id: str | None = None
    viber_id: str | None = None
    web_push: WebPushSubscription | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Recipient:
        """From the stored / API form, where `web_push` is `{endpoint, keys: {p256dh, auth}}`."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        web_push = fields.pop("web_push", None)
        subscription = None
        if web_push:
            keys = web_push.get("keys", web_push)
            subscription = WebPushSubscription(
                endpoint=web_push["endpoint"], p256dh=keys["p256dh"], auth=keys["auth"]
            )
        return cls(**fields, web_push=subscription)


@dataclass(frozen=True, slots=True)
class Content:
    text: str | None = None
    subject: str | None = None
    html: str | None = None
    title: str | None = None
    # A provider-side template (WhatsApp): its name, language and body parameters.
    template_name: str | None = None
    template_language: str | None = None
    template_params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One send of one cascade step.

    `attempt_id` is unique per (message, step): adapters pass it to the provider as the
    client reference / idempotency key where the API takes one, so a retried send is
    not a second message. `try_number` counts transient retries of this attempt (0 first).
    `web_push` carries the whole subscription: `address` is only its endpoint, and the
    payload must be encrypted to the subscription's keys (RFC 8291).
    """

    message_id: str
    attempt_id: str
    category: Category
    channel: Channel
    address: str
    content: Content
    timeout_seconds: int
    try_number: int = 0
    status_callback_url: str | None = None
    # Push only: lets the app confirm delivery at POST /v1/messages/{id}/receipts.
    receipt_token: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    web_push: WebPushSubscription | None = None
    # Extra protocol headers (email: List-Unsubscribe for marketing); adapters that have
    # no headers ignore them.
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Accepted:
    provider_message_id: str
    # SMS: how many messages the text went as (concatenated parts), where the adapter knows.
    segments: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    code: str
    detail: str


SendResult = Accepted | Rejected


class ProviderError(Exception):
    """Base of the errors an adapter raises."""


class TransientProviderError(ProviderError):
    """429, 5xx, timeouts: the same send may succeed later, inside the step window.

    `provider_fault` is False when the error is about the recipient rather than the
    provider (it must not trip a circuit breaker). `maybe_sent`: the request went out and
    no answer came back (a read timeout, a dropped connection), so the provider may have
    taken it: it is not sent again (that could deliver it twice); its receipt, matched by
    the attempt id, or the step's deadline decides.
    """

    def __init__(
        self,
        code: str,
        detail: str = "",
        *,
        retry_after: float | None = None,
        provider_fault: bool = True,
        maybe_sent: bool = False,
    ) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
        self.provider_fault = provider_fault
        self.maybe_sent = maybe_sent


class InvalidSignature(ProviderError):
    """A callback whose signature does not verify: refused with 401, never applied."""


class MalformedCallback(ProviderError):
    """A callback that verifies but cannot be understood: refused with 400."""


@dataclass(frozen=True, slots=True)
class ProviderCallback:
    """An inbound HTTP request from a provider, as received (raw bytes kept for signatures)."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReportedPrice:
    """What a receipt says the send cost: an amount, or whether it is billable and under
    which pricing category (WhatsApp's `pricing`), priced from the account's table."""

    amount: Decimal | None = None
    currency: str | None = None
    billable: bool | None = None
    category: str | None = None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """One status a provider reported for one of our sends.

    Either `attempt_id` (when the provider echoes our reference) or
    `provider_message_id` identifies the attempt. `event_id` is the provider's own id
    for this report (or a stable digest of it) so the same report twice is applied once.
    """

    status: ReceiptStatus
    event_id: str
    provider_message_id: str | None = None
    attempt_id: str | None = None
    error_code: str | None = None
    error_detail: str | None = None
    occurred_at: datetime | None = None
    price: ReportedPrice | None = None


@runtime_checkable
class SubscriptionHandshake(Protocol):
    """Providers that verify a callback URL with a GET challenge (WhatsApp's `hub.challenge`)."""

    def verify_subscription(self, query: Mapping[str, str]) -> str | None: ...


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message a recipient sent us (a reply), as a provider reported it."""

    channel: Channel
    sender: str  # the recipient's address: E.164 for SMS
    text: str
    event_id: str
    # When the recipient sent it, where the provider says (Twilio's webhook does not).
    sent_at: datetime | None = None
    # Our address it was sent to (a Twilio number), where the provider says.
    to: str | None = None


@runtime_checkable
class InboundReceiver(Protocol):
    """Providers that forward replies (e.g. `STOP`) to `/v1/providers/{name}/inbound`."""

    async def parse_inbound(self, callback: ProviderCallback) -> list[InboundMessage]:
        """Verify the callback's signature and return the messages it carries."""
        ...


@dataclass(frozen=True, slots=True)
class CallbackContents:
    """What one callback carries when statuses and replies share a URL."""

    statuses: list[StatusUpdate] = field(default_factory=list)
    inbound: list[InboundMessage] = field(default_factory=list)


@runtime_checkable
class SharedCallbacks(Protocol):
    """Providers whose replies arrive on the status callback URL, mixed with the
    statuses (WhatsApp's and Viber's one webhook): the status route takes both."""

    async def parse_callback(self, callback: ProviderCallback) -> CallbackContents:
        """Verify the callback's signature and return the statuses and replies it carries."""
        ...


@runtime_checkable
class Cancellable(Protocol):
    """Providers whose API can withdraw a send they accepted but have not delivered yet."""

    async def cancel(self, provider_message_id: str) -> bool:
        """True when the provider withdrew it; False when it no longer can."""
        ...


@runtime_checkable
class SessionProvider(Protocol):
    """Providers holding a connection (SMPP) whose receipts arrive on it, not over HTTP."""

    async def start(self) -> None: ...


@runtime_checkable
class Provider(Protocol):
    name: str
    channel: Channel

    def address(self, to: Recipient) -> str | None:
        """The recipient address this provider sends to, or None when `to` lacks it."""
        ...

    async def send(self, message: OutboundMessage) -> SendResult: ...

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        """Verify the callback's signature and return the status updates it carries."""
        ...

    async def aclose(self) -> None: ...
