"""What a ledger event looks like to an integrator: its type and its payload (pure).

Ledger events about an attempt carry an attempt id (`sending`, `sent`, `delivered`,
`read`, `failed`, `rejected`, `expired`); events about the message as a whole carry none
(`accepted` and the final statuses). Reading is an engagement signal about the message,
so an attempt's `read`/`checked` becomes `message.read`/`message.checked`; the three ways
an attempt can end badly are one type, `message.attempt.failed`, with the attempt's status
saying which.

`inbound.received` is about no event of a message: a recipient's reply, stored in
`inbound_messages`; its `data` says who wrote what, and which message it answers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson


class EventType(StrEnum):
    """The types an endpoint can subscribe to."""

    MESSAGE_ACCEPTED = "message.accepted"
    MESSAGE_QUEUED = "message.queued"
    ATTEMPT_SENDING = "message.attempt.sending"
    ATTEMPT_SENT = "message.attempt.sent"
    ATTEMPT_DELIVERED = "message.attempt.delivered"
    ATTEMPT_FAILED = "message.attempt.failed"
    ATTEMPT_SUPPRESSED = "message.attempt.suppressed"
    ATTEMPT_SKIPPED = "message.attempt.skipped"
    MESSAGE_DELIVERED = "message.delivered"
    # A later step was delivered too (a late receipt after the fallback was sent).
    MESSAGE_DELIVERED_AGAIN = "message.delivered_again"
    MESSAGE_READ = "message.read"
    MESSAGE_CHECKED = "message.checked"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_EXPIRED = "message.expired"
    MESSAGE_CANCELLED = "message.cancelled"
    MESSAGE_SUPPRESSED = "message.suppressed"
    # A recipient wrote back (not a ledger event: see `inbound_event_data`).
    INBOUND_RECEIVED = "inbound.received"


# Sent only by `POST /v1/webhooks/{id}/test`, whatever the endpoint's filter.
TEST_EVENT_TYPE = "webhook.test"

_ATTEMPT_TYPES = {
    "sending": EventType.ATTEMPT_SENDING,
    "sent": EventType.ATTEMPT_SENT,
    "delivered": EventType.ATTEMPT_DELIVERED,
    "read": EventType.MESSAGE_READ,
    "checked": EventType.MESSAGE_CHECKED,
    "failed": EventType.ATTEMPT_FAILED,
    "rejected": EventType.ATTEMPT_FAILED,
    "expired": EventType.ATTEMPT_FAILED,
    "suppressed": EventType.ATTEMPT_SUPPRESSED,
    "skipped": EventType.ATTEMPT_SKIPPED,
}


def event_type(status: str, about_attempt: bool) -> str:
    """The webhook type of a ledger event; statuses added later map by name."""
    if about_attempt:
        known = _ATTEMPT_TYPES.get(status)
        return known.value if known else f"message.attempt.{status}"
    return f"message.{status}"


@dataclass(frozen=True, slots=True)
class Subscription:
    """An endpoint's filters; None means everything."""

    event_types: Collection[str] | None
    categories: Collection[str] | None

    def wants(self, type_: str, category: str) -> bool:
        return (self.event_types is None or type_ in self.event_types) and (
            self.categories is None or category in self.categories
        )


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def payload(type_: str, at: datetime, data: Mapping[str, Any]) -> str:
    """The body every delivery of this event sends, byte for byte."""
    return orjson.dumps({"type": type_, "timestamp": iso(at), "data": data}).decode()


def message_event_data(
    *,
    message_id: str,
    category: str,
    status: str,
    sequence: int,
    delivered_channel: str | None,
    metadata: Mapping[str, Any],
    attempt: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "category": category,
        # The message's status when the event was dispatched; `sequence` orders events.
        "status": status,
        "sequence": sequence,
        "delivered_channel": delivered_channel,
        "metadata": dict(metadata),
        "attempt": dict(attempt) if attempt is not None else None,
    }


def inbound_event_data(
    *,
    inbound_id: str,
    channel: str,
    provider: str,
    sender: str,
    to: str | None,
    text: str,
    received_at: datetime,
    said_at: datetime,
    in_reply_to: str | None,
) -> dict[str, Any]:
    return {
        "inbound_id": inbound_id,
        "channel": channel,
        "provider": provider,
        "from": sender,
        "to": to,
        "text": text,
        "received_at": iso(received_at),
        # When the recipient sent it, where the provider says (else `received_at`).
        "said_at": iso(said_at),
        # The tenant's latest message to `from` on this channel.
        "in_reply_to": in_reply_to,
    }
