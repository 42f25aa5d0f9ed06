"""Time-ordered ids (UUIDv7) with a type prefix in the API: `msg_…`, `att_…`."""

from __future__ import annotations

import uuid
from typing import Final, Literal

import uuid_utils.compat

Prefix = Literal["msg", "att", "evt", "inb", "key", "tpl", "whd", "whe"]


class IdPrefix:
    """The prefix of each kind of public id, named once. Plain `str` constants, not an
    enum: an enum member formats through `__format__` into a new string on every id the
    hot path writes."""

    MESSAGE: Final = "msg"
    ATTEMPT: Final = "att"
    EVENT: Final = "evt"
    INBOUND: Final = "inb"
    API_KEY: Final = "key"
    TEMPLATE: Final = "tpl"
    WEBHOOK_DELIVERY: Final = "whd"
    WEBHOOK_ENDPOINT: Final = "whe"


def new_id() -> uuid.UUID:
    return uuid_utils.compat.uuid7()


def to_public(prefix: Prefix, value: uuid.UUID) -> str:
    return f"{prefix}_{value.hex}"


def from_public(prefix: Prefix, public_id: str) -> uuid.UUID | None:
    """The UUID inside `prefix_<hex>`, or None when it is not one of ours."""
    head, sep, tail = public_id.partition("_")
    if head != prefix or not sep or len(tail) != 32:
        return None
    try:
        return uuid.UUID(hex=tail)
    except ValueError:
        return None
