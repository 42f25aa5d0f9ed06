"""Time-ordered ids (UUIDv7) with a type prefix in the API: `msg_…`, `att_…`."""

from __future__ import annotations

import uuid

import uuid_utils.compat


def new_id() -> uuid.UUID:
    return uuid_utils.compat.uuid7()


def to_public(prefix: str, value: uuid.UUID) -> str:
    return f"{prefix}_{value.hex}"


def from_public(prefix: str, public_id: str) -> uuid.UUID | None:
    """The UUID inside `prefix_<hex>`, or None when it is not one of ours."""
    head, sep, tail = public_id.partition("_")
    if head != prefix or not sep or len(tail) != 32:
        return None
    try:
        return uuid.UUID(hex=tail)
    except ValueError:
        return None
