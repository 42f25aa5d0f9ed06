"""The recipient timeline at the API edge."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.messages.schemas import AttemptView, MessageSummary
from app.pagination import NextCursor
from providers.base import Channel


class InboundView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    channel: Channel
    provider: str
    from_: str = Field(alias="from", description="The sender, normalised")
    to: str | None = Field(description="Our address it was sent to, where the provider says")
    text: str
    in_reply_to: str | None = Field(
        description="The latest message to the sender on this channel when it arrived"
    )
    said_at: datetime = Field(
        description="When the recipient sent it, where the provider says (else received_at)"
    )
    received_at: datetime


class OutboundItem(BaseModel):
    type: Literal["message"]
    at: datetime = Field(description="The message's `created_at`")
    message: MessageSummary
    attempts: list[AttemptView]


class InboundItem(BaseModel):
    type: Literal["inbound"]
    at: datetime = Field(description="The reply's `received_at`")
    inbound: InboundView


TimelineItem = Annotated[OutboundItem | InboundItem, Field(discriminator="type")]


class Timeline(BaseModel):
    address: str = Field(description="The address as matched (normalised)")
    channel: Channel | None
    data: list[TimelineItem] = Field(description="Newest first")
    next_cursor: NextCursor = None
