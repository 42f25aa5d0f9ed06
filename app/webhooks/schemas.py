"""The webhook API's shapes (pydantic at the edge only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from app.input_checks import UtcDateTime, fits_in_utc
from app.pagination import NextCursor
from app.webhooks.events import EventType
from providers.base import Category

EndpointUrl = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, max_length=2048, pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://"
    ),
    Field(
        description="Where events are POSTed: https (plain http only to loopback in dev mode).",
        examples=["https://example.com/hooks/cascade"],
    ),
]
Description = Annotated[str, StringConstraints(max_length=500)]


T = TypeVar("T")


def _unique(values: list[T] | None) -> list[T] | None:
    return list(dict.fromkeys(values)) if values is not None else None


EventTypes = Annotated[
    list[EventType] | None,
    Field(
        min_length=1,
        description="Only these event types; null (the default) means all.",
    ),
    AfterValidator(_unique),
]
Categories = Annotated[
    list[Category] | None,
    Field(min_length=1, description="Only messages of these categories; null means all."),
    AfterValidator(_unique),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateEndpointRequest(Strict):
    url: EndpointUrl
    description: Description = ""
    event_types: EventTypes = None
    categories: Categories = None


class UpdateEndpointRequest(Strict):
    """Only the fields given change; `enabled: true` re-enables a disabled endpoint."""

    url: EndpointUrl | None = None
    description: Description | None = None
    event_types: EventTypes = None
    categories: Categories = None
    enabled: bool | None = None


class EndpointView(BaseModel):
    id: str = Field(examples=["whe_0193a5b2c3d47e8f9a0b1c2d3e4f5a6b"])
    url: str
    description: str
    event_types: list[EventType] | None
    categories: list[Category] | None
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    failing_since: datetime | None = Field(
        description="Start of the current run of failed attempts (disabled after 5 days)."
    )
    created_at: datetime
    updated_at: datetime


class CreatedEndpoint(EndpointView):
    secret: str = Field(description="The signing secret (`whsec_…`); shown only now.")


class EndpointList(BaseModel):
    data: list[EndpointView]


class RotatedSecret(BaseModel):
    secret: str = Field(description="The new signing secret; shown only now.")
    previous_secret_expires_at: datetime = Field(
        description="Until then each delivery is signed with both secrets."
    )


class ReplayRequest(Strict):
    """One delivery by id, or every delivery created since a time (succeeded or failed;
    `recover` sends only the failed ones)."""

    delivery_id: str | None = Field(default=None, examples=["whd_0193a5b2c3d47e8f9a0b1c2d3e4f5a6b"])
    since: Annotated[datetime, AfterValidator(fits_in_utc)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.delivery_id is None) == (self.since is None):
            raise ValueError("give exactly one of `delivery_id` and `since`")
        if self.since is not None and self.since.tzinfo is None:
            raise ValueError("`since` needs a time zone (e.g. 2026-01-31T00:00:00Z)")
        return self


class RecoverRequest(Strict):
    """Every failed delivery created since a time."""

    since: UtcDateTime = Field(examples=["2026-01-31T00:00:00Z"])


class ReplayResult(BaseModel):
    replayed: int


class DeliveryView(BaseModel):
    id: str
    event_id: str
    event_type: str
    message_id: str
    status: str = Field(description="pending | succeeded | failed")
    attempts: int
    response_status_code: int | None
    latency_ms: int | None
    response_body: str | None = Field(description="The receiver's answer, first 1 KiB.")
    error: str | None
    next_retry_at: datetime | None
    last_attempt_at: datetime | None
    created_at: datetime


class DeliveryPage(BaseModel):
    data: list[DeliveryView]
    next_cursor: NextCursor = None


class TestDeliveryResult(BaseModel):
    succeeded: bool
    webhook_id: str
    status_code: int | None
    latency_ms: int
    response_body: str | None
    error: str | None
