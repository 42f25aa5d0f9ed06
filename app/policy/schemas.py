"""The API's policy shapes: suppressions and the tenant's delivery policy."""

from __future__ import annotations

from datetime import datetime, time
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from app.pagination import NextCursor
from app.policy.quiet_hours import is_time_zone
from providers.base import Category, Channel


class Reason(StrEnum):
    UNSUBSCRIBED = "unsubscribed"
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"


# These suppress every category; the others only marketing.
ALL_CATEGORY_REASONS = frozenset({Reason.HARD_BOUNCE, Reason.COMPLAINT})


def _time_zone(value: str) -> str:
    if not is_time_zone(value):
        raise ValueError("not an IANA time zone name (e.g. Europe/Warsaw)")
    return value


def _naive(value: time) -> time:
    if value.tzinfo is not None:
        raise ValueError("a wall-clock time without offset (the zone is the recipient's)")
    return value


TimeZone = Annotated[str, StringConstraints(max_length=64), AfterValidator(_time_zone)]
Locale = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$", max_length=35)
]
WallTime = Annotated[time, AfterValidator(_naive)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuppressionIn(Strict):
    channel: Channel
    address: Annotated[str, StringConstraints(min_length=1, max_length=320, strip_whitespace=True)]
    reason: Reason = Reason.MANUAL


class SuppressionView(BaseModel):
    channel: Channel
    address: str
    reason: Reason
    source: str = Field(description="api, unsubscribe (one-click link), inbound (STOP), bounce")
    applies_to: Literal["marketing", "all"]
    created_at: datetime


class SuppressionList(BaseModel):
    data: list[SuppressionView]
    next_cursor: NextCursor = None


class QuietHours(Strict):
    start: WallTime = Field(description="Local time the quiet window starts, e.g. 21:00")
    end: WallTime = Field(description="Local time it ends, e.g. 08:00 (the next day)")

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class FrequencyCap(Strict):
    limit: Annotated[int, Field(ge=1, le=1000)] = Field(
        description="Marketing messages a recipient may get per window"
    )
    window_seconds: Annotated[int, Field(ge=60, le=30 * 24 * 3600)] = Field(
        description="The rolling window, e.g. 86400 for 24 h"
    )


class SkipUnreachable(Strict):
    after_failures: Annotated[int, Field(ge=1, le=10)] = Field(
        default=3,
        description="Skip a step whose address failed this many times in a row on its"
        " channel (failure receipt, no receipt before the timeout, refused by the provider)",
    )
    window_seconds: Annotated[int, Field(ge=60, le=90 * 24 * 3600)] = Field(
        default=7 * 24 * 3600, description="Only failures this recent count (default 7 days)"
    )


class PolicyIn(Strict):
    timezone: TimeZone = Field(
        default="UTC", description="For quiet hours when `to.timezone` is not given"
    )
    locale: Locale = Field(default="en", description="Template locale when none matches")
    quiet_hours: QuietHours | None = None
    frequency_cap: FrequencyCap | None = None
    skip_unreachable: SkipUnreachable | None = Field(
        default=None,
        description="Skip steps to addresses known dead (attempt `skipped`, error"
        " `recipient_unreachable`) instead of waiting out their timeout; a delivery to the"
        " address resets it. Null: off.",
    )
    dedupe_window: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] | None = Field(
        default=None,
        description="Seconds: a message with the same content to a recipient sharing an"
        " address with one sent within this window is not sent again (`suppressed`,"
        " reason `duplicate`, `duplicate_of`). Null: off.",
    )


class PolicyView(PolicyIn):
    updated_at: datetime | None = None


class InboundReceipt(BaseModel):
    received: int
    applied: int


class Unsubscribed(BaseModel):
    channel: Channel
    unsubscribed: bool = True


class PreferencesIn(Strict):
    opt_out: dict[Category, list[Channel]] = Field(
        default_factory=dict,
        description="Per category, the channels this person opted out of: a cascade step on"
        " one is skipped (attempt `suppressed`, error `preference`)",
    )
    preferred_channel: Channel | None = Field(
        default=None,
        description="Tried first by messages sent with `reorder: true` whose cascade has it",
    )


class PreferencesView(PreferencesIn):
    address_key: str = Field(description="`phone:+48…`, `email:ann@…` or `id:<token>`")
    updated_at: datetime
