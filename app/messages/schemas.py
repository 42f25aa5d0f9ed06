"""The API's message shapes (pydantic at the edge only)."""

from __future__ import annotations

import functools
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Self

import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)
from pydantic.networks import validate_email

from app.cascade.machine import AttemptStatus, MessageStatus, SuccessOn
from app.errors import FieldError, Problem
from app.input_checks import UtcDateTime
from app.pagination import NextCursor
from app.policy.schemas import TimeZone
from app.templates.schemas import LocaleTag, TemplateName
from providers.base import Category, Channel


@functools.lru_cache(maxsize=16384)
def _e164(value: str) -> str:
    # Cached by the raw string: parsing is most of a batch item's validation, and a
    # number that comes again (the same audience in the next campaign, a retried send)
    # is not parsed again. Invalid numbers raise, so they are never cached.
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not an E.164 phone number: {exc}") from None
    if not value.startswith("+") or not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid E.164 phone number (e.g. +48600100200)")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@functools.lru_cache(maxsize=16384)
def _email(value: str) -> str:
    # pydantic's own EmailStr check (same normal form, same errors), cached like `_e164`:
    # uncached it was most of a message's validation.
    return validate_email(value)[1]


Phone = Annotated[str, StringConstraints(max_length=20), AfterValidator(_e164)]
Email = Annotated[
    str, AfterValidator(_email), WithJsonSchema({"type": "string", "format": "email"})
]
Token = Annotated[str, StringConstraints(min_length=1, max_length=4096, strip_whitespace=True)]
ShortId = Annotated[str, StringConstraints(pattern=r"^-?[0-9A-Za-z_=+/.-]{1,64}$")]
# A chat id, or a public channel's or supergroup's "@username" (5-32 of A-Z a-z 0-9 _).
TelegramChatId = Annotated[
    str,
    StringConstraints(pattern=r"^(-?[0-9A-Za-z_=+/.-]{1,64}|@[A-Za-z0-9_]{5,32})$"),
    Field(description='A chat id, or "@channelusername" for a public channel or supergroup'),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebPushKeys(Strict):
    p256dh: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{20,200}={0,2}$")]
    auth: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}={0,2}$")]


class WebPushSubscriptionIn(Strict):
    """A browser PushSubscription as `PushSubscription.toJSON()` gives it."""

    endpoint: Annotated[str, StringConstraints(pattern=r"^https://", max_length=2048)]
    keys: WebPushKeys
    expirationTime: int | None = None  # the browser's own field name


class RecipientIn(Strict):
    push_token: Token | None = None
    phone: Phone | None = None
    email: Email | None = None
    whatsapp: Phone | None = None
    telegram_chat_id: TelegramChatId | None = None
    viber_id: ShortId | None = None
    web_push: WebPushSubscriptionIn | None = None
    timezone: TimeZone | None = Field(
        default=None,
        description="IANA zone for marketing quiet hours (default: the tenant's policy)",
    )


class ContentIn(Strict):
    text: Annotated[str, StringConstraints(max_length=10_000)] | None = None
    subject: Annotated[str, StringConstraints(max_length=500)] | None = None
    html: Annotated[str, StringConstraints(max_length=100_000)] | None = None
    title: Annotated[str, StringConstraints(max_length=500)] | None = None
    template: TemplateName | None = Field(
        default=None, description="A template's name: rendered with `data` at accept time"
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="The template's variables",
        # A factory, not `default={}`, which pydantic deep-copies per model.
        json_schema_extra={"default": {}},
    )
    locale: LocaleTag | None = Field(
        default=None,
        description="Template locale; falls back `pl-PL` → `pl` → the tenant's → `en`",
    )

    @model_validator(mode="after")
    def _template_or_inline(self) -> Self:
        if self.template is not None:
            if any(v is not None for v in (self.text, self.subject, self.html, self.title)):
                raise ValueError("give a `template` or inline text/subject/html/title, not both")
        elif self.data or self.locale:
            raise ValueError("`data` and `locale` need a `template`")
        return self


class CascadeStepIn(Strict):
    channel: Channel
    provider: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,40}$")] | None = None
    timeout: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] | None = Field(
        default=None, description="Seconds to wait for success before falling over."
    )
    success_on: SuccessOn | None = Field(
        default=None, description="What counts as success for this step (per-channel default)."
    )


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class SendMessageRequest(Strict):
    category: Category
    to: RecipientIn
    content: ContentIn
    cascade: Annotated[list[CascadeStepIn], Field(min_length=1, max_length=8)]
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=32)] = {}
    send_at: UtcDateTime | None = Field(
        default=None, description="Send no earlier than this (the message waits `queued`)"
    )
    expires_at: UtcDateTime | None = Field(
        default=None, description="Not delivered by then: the message ends `expired`"
    )
    reorder: bool = Field(
        default=False,
        description="Try the recipient's preferred channel first (their preferences,"
        " `PUT /v1/recipients/{address}/preferences`) when the cascade has it",
    )

    @model_validator(mode="after")
    def _expires_after_start(self) -> Self:
        if self.send_at and self.expires_at and self.expires_at <= self.send_at:
            raise ValueError("`expires_at` must be after `send_at`")
        return self


class AcceptedMessage(BaseModel):
    id: str = Field(examples=["msg_0193a5b2c3d47e8f9a0b1c2d3e4f5a6b"])
    status: MessageStatus
    category: Category
    created_at: datetime


class ErrorView(BaseModel):
    code: str
    detail: str | None = None


class AttemptView(BaseModel):
    id: str
    step: int
    channel: Channel
    provider: str
    status: AttemptStatus
    provider_message_id: str | None
    error: ErrorView | None
    tries: int
    created_at: datetime
    sent_at: datetime | None
    completed_at: datetime | None
    deadline_at: datetime
    segments: int | None = Field(
        default=None, description="SMS: how many messages the text went as, where known"
    )
    cost: Decimal | None = Field(
        default=None,
        description="What the send cost: priced from the account's price table when the"
        " provider accepted it, or as a receipt reported it; null when the account has no"
        " price for it (a rejected send costs nothing).",
    )
    currency: str | None = Field(default=None, description="ISO 4217, with `cost`.")


class EventView(BaseModel):
    seq: int
    at: datetime = Field(description="When Cascade recorded it.")
    occurred_at: datetime | None = Field(
        default=None,
        description="When the provider says it happened (e.g. the handset got the message);"
        " null when the provider gives no time.",
    )
    status: str
    source: str
    attempt: str | None
    step: int | None
    detail: dict[str, Any] | None = None


class CascadeStepView(BaseModel):
    channel: Channel
    provider: str
    timeout: int
    success_on: SuccessOn


class MessageView(BaseModel):
    id: str
    category: Category
    status: MessageStatus
    delivered_channel: Channel | None
    delivered_step: int | None
    current_step: int
    to: dict[str, Any]
    cascade: list[CascadeStepView]
    metadata: dict[str, str]
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    attempts: list[AttemptView]
    events: list[EventView]
    cost: Decimal | None = Field(
        default=None,
        description="The sum of the attempts' costs; null when one was sent on an account"
        " with no price for it, or none was sent.",
    )
    currency: str | None = None
    send_at: datetime | None = None
    expires_at: datetime | None = None
    suppressed_reason: str | None = Field(
        default=None,
        description="Why a `suppressed` message was not sent: `duplicate` (its tenant's"
        " `dedupe_window`), `frequency_cap`, `address_suppressed` (every step's address is"
        " on the suppression list)",
    )
    duplicate_of: str | None = Field(
        default=None,
        description="The message this one duplicated (`suppressed_reason` `duplicate`)",
    )


class BatchMessageIn(Strict):
    """One recipient of a batch: `to` and `data`, plus anything it overrides."""

    to: RecipientIn
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged over the batch's `content.data`",
        json_schema_extra={"default": {}},  # see ContentIn.data
    )
    locale: LocaleTag | None = Field(default=None, description="Overrides `content.locale`")
    content: ContentIn | None = Field(default=None, description="Replaces the batch's content")
    cascade: Annotated[list[CascadeStepIn], Field(min_length=1, max_length=8)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=32)] | None = None
    send_at: UtcDateTime | None = None
    expires_at: UtcDateTime | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = Field(
        default=None, description="Per message, shared with `POST /v1/messages` keys"
    )


class InvalidBatchItem:
    """An item that failed validation: kept so the rest of the batch goes ahead."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors


def _keep_invalid(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError as exc:
        return InvalidBatchItem(
            [
                FieldError(
                    path=".".join(str(part) for part in err["loc"]),
                    message=err["msg"],
                    type=err["type"],
                )
                for err in exc.errors()
            ]
        )


# Validated one by one: an invalid item is reported in its result, not a 422 for all.
BatchItem = Annotated[BatchMessageIn, WrapValidator(_keep_invalid)]


class SendBatchRequest(Strict):
    category: Category
    cascade: Annotated[list[CascadeStepIn], Field(min_length=1, max_length=8)] | None = None
    content: ContentIn | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=32)] = {}
    send_at: UtcDateTime | None = None
    expires_at: UtcDateTime | None = None
    messages: Annotated[list[BatchItem], Field(min_length=1, max_length=1000)]


class BatchItemResult(BaseModel):
    index: int
    id: str | None = None
    status: MessageStatus | None = None
    problem: Problem | None = None


class BatchResult(BaseModel):
    accepted: int
    rejected: int
    results: list[BatchItemResult]


class LastErrorView(BaseModel):
    step: int
    channel: Channel
    code: str
    detail: str | None = None


class MessageSummary(BaseModel):
    id: str
    category: Category
    status: MessageStatus
    delivered_channel: Channel | None
    delivered_step: int | None
    current_step: int
    to: dict[str, Any]
    metadata: dict[str, str]
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    last_error: LastErrorView | None = Field(
        description="Why the latest unsuccessful attempt failed (rejected, failed, expired)."
    )


class MessagePage(BaseModel):
    data: list[MessageSummary]
    next_cursor: NextCursor = None
