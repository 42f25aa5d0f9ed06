"""The event feed's shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from providers.base import Category


class FeedEvent(BaseModel):
    cursor: str
    message_id: str
    category: Category
    seq: int
    at: datetime
    status: str
    source: str
    step: int | None
    channel: str | None
    provider: str | None
    attempt: str | None
    detail: dict[str, Any] | None = None


class EventPage(BaseModel):
    data: list[FeedEvent] = Field(description="Oldest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the events that follow (the same cursor again"
        " when nothing new has settled yet)."
    )
