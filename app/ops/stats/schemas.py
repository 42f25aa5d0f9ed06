"""The stats API's shapes."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, Field

from providers.base import Category


class Bucket(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"


class SeriesPoint(BaseModel):
    bucket: datetime
    category: Category
    channel: str
    status: str
    messages: int


class CountView(BaseModel):
    category: Category
    channel: str = Field(description="The channel of the step the message ended on.")
    status: str = Field(description="The message's final status.")
    messages: int


class StepView(BaseModel):
    step: int
    reached: int = Field(description="Messages that got as far as this step.")
    delivered: int = Field(description="Messages delivered on this step.")
    ended: int = Field(description="Messages whose cascade ended on this step (any outcome).")
    delivery_rate: float | None


class LatencyView(BaseModel):
    delivered: int
    mean_ms: float | None
    median_ms: float | None = Field(description="Interpolated from a latency histogram.")
    p95_ms: float | None


class CategoryView(BaseModel):
    category: Category
    messages: int
    delivered: int
    delivered_on_later_step: int
    failover_rate: float | None = Field(
        description="Share of delivered messages delivered on a step after the first."
    )
    time_to_deliver: LatencyView
    cost: Decimal | None = Field(
        description="Spend: what the messages' attempts cost (every step tried), summed over"
        " the priced messages; null when none is priced."
    )
    saved: Decimal | None = Field(
        description="Over the delivered priced messages: what sending each on its cascade's"
        " last step would have cost, less what it cost (negative: the cascade cost more)."
    )
    unpriced: int = Field(description="Messages with no known cost (accounts without a price).")


class ChannelView(BaseModel):
    """How well one channel does for one category, by the step messages ended on."""

    category: Category
    channel: str = Field(description="The channel of the step the messages ended on.")
    messages: int
    delivered: int
    delivery_rate: float | None = Field(
        description="Delivered / messages whose cascade ended on this channel."
    )
    median_ms: float | None = Field(description="Median time to deliver (accept to delivered).")
    fell_over: float | None = Field(
        description="Share of the messages delivered here that fell over from an earlier step."
    )
    cost: Decimal | None = Field(description="Spend of the priced messages that ended here.")
    cost_per_delivered: Decimal | None
    saved: Decimal | None
    unpriced: int


class StatsView(BaseModel):
    start: datetime = Field(serialization_alias="from")
    end: datetime = Field(serialization_alias="to")
    bucket: Bucket
    messages: int = Field(description="Messages that reached a final status in the range.")
    by_status: dict[str, int]
    failover_rate: float | None
    time_to_deliver: LatencyView
    counts: list[CountView] = Field(description="Category x channel x final status.")
    series: list[SeriesPoint] = Field(description="The counts per time bucket.")
    steps: list[StepView] = Field(description="The failover funnel: delivery rate per step.")
    by_category: list[CategoryView]
    by_channel: list[ChannelView] = Field(description="Effectiveness per category x channel.")
    currency: str | None = Field(
        description="The deployment's one currency (ISO 4217) of every amount; null when no"
        " provider account has a price."
    )
    cost: Decimal | None = Field(description="Spend over the range (see `by_category`).")
    saved: Decimal | None
    unpriced: int
