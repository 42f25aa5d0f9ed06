"""What a provider is handed for one attempt: the rendered content, addresses, callbacks."""

from __future__ import annotations

import uuid

from app.auth.receipts import receipt_token
from app.ids import IdPrefix, to_public
from app.ledger.repository import MessageRow
from app.policy import service as policy
from app.settings import Settings
from app.templates.rendering import channel_content
from providers.base import Category, Channel, Content, OutboundMessage, Provider, Recipient


def _content(message: MessageRow, channel: Channel) -> Content:
    stored = channel_content(message.content, channel)
    stored["template_params"] = tuple(stored.get("template_params", ()))
    return Content(**{k: v for k, v in stored.items() if k in Content.__dataclass_fields__})


def outbound_message(
    message: MessageRow,
    attempt_id: uuid.UUID,
    step: int,
    address: str,
    tries: int,
    settings: Settings,
    provider: Provider,
) -> OutboundMessage:
    spec = message.cascade[step]
    channel = Channel(spec["channel"])
    public_message, public_attempt = (
        to_public(IdPrefix.MESSAGE, message.id),
        to_public(IdPrefix.ATTEMPT, attempt_id),
    )
    return OutboundMessage(
        message_id=public_message,
        attempt_id=public_attempt,
        category=Category(message.category),
        channel=channel,
        address=address,
        content=_content(message, channel),
        timeout_seconds=int(spec["timeout"]),
        try_number=tries,
        status_callback_url=(
            f"{settings.callback_base}/v1/providers/{provider.name}/status?attempt={public_attempt}"
        ),
        receipt_token=(
            receipt_token(settings.receipt_signing_keys, public_message)
            if channel == Channel.PUSH
            else None
        ),
        metadata={k: str(v) for k, v in message.metadata.items()},
        web_push=Recipient.from_mapping(message.recipient).web_push,
        headers=(
            policy.unsubscribe_headers(settings, message.tenant_id, address)
            if message.category == Category.MARKETING and channel == Channel.EMAIL
            else {}
        ),
    )
