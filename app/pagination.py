"""The one cursor codec and query parameter every list endpoint pages with.

A cursor is the sort key of the last row a page showed, tagged with the list it belongs
to, as url-safe base64 of a JSON array: `["msg", "2026-…+00:00", "0192…"]`. It is opaque
to clients (they only pass `next_cursor` back as `cursor`) and carries no authority: every
query is scoped to the caller's tenant, so a cursor is only a position. Decoding checks
the tag, the arity and each value's type, so a malformed or edited cursor is a 422
(`errors[0].type == "cursor"`), never a query with a value we did not hand out.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Annotated, Any, TypeVar, overload

import orjson
from fastapi import Query
from pydantic import Field

from app.errors import FieldError, InvalidRequest
from app.input_checks import NUL, fits_in_utc

CursorValue = str | int | datetime | uuid.UUID
A = TypeVar("A", str, int, datetime, uuid.UUID)
B = TypeVar("B", str, int, datetime, uuid.UUID)

MAX_CURSOR_LENGTH = 1000

CursorParam = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_CURSOR_LENGTH,
        description="The previous page's `next_cursor`; omit for the first page.",
    ),
]

NextCursor = Annotated[
    str | None,
    Field(description="Pass as `cursor` for the next page; null on the last page."),
]


def _plain(value: CursorValue) -> str | int:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return value.hex
    return value


def encode_cursor(kind: str, *values: CursorValue) -> str:
    """`values` (the last row's sort key) as a cursor of list `kind`."""
    raw = orjson.dumps([kind, *map(_plain, values)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _typed(value: Any, wanted: type[A]) -> A:
    if wanted is str:
        if not isinstance(value, str) or NUL in value:
            raise ValueError("not a string")
        return value  # type: ignore[return-value]
    if wanted is int:
        if type(value) is not int or value < 0:
            raise ValueError("not an int")
        return value  # type: ignore[return-value]
    if not isinstance(value, str):
        raise ValueError("not a string")
    if wanted is datetime:
        at = fits_in_utc(datetime.fromisoformat(value))
        if at.tzinfo is None:
            raise ValueError("naive time")
        return at  # type: ignore[return-value]
    return uuid.UUID(hex=value)  # type: ignore[return-value]


def invalid_cursor(param: str = "cursor") -> InvalidRequest:
    return InvalidRequest(
        "the cursor is not one this API gave out",
        [FieldError(path=f"query.{param}", message="invalid cursor", type="cursor")],
    )


@overload
def decode_cursor(
    cursor: str, kind: str, shape: tuple[type[A]], *, param: str = ...
) -> tuple[A]: ...
@overload
def decode_cursor(
    cursor: str, kind: str, shape: tuple[type[A], type[B]], *, param: str = ...
) -> tuple[A, B]: ...
def decode_cursor(
    cursor: str, kind: str, shape: tuple[type[Any], ...], *, param: str = "cursor"
) -> tuple[Any, ...]:
    """The sort key inside a cursor of list `kind`, typed as `shape`; a 422 otherwise."""
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(decoded, list) or len(decoded) != len(shape) + 1:
            raise ValueError("wrong shape")
        tag, *values = decoded
        if tag != kind:
            raise ValueError("another list's cursor")
        return tuple(_typed(value, wanted) for value, wanted in zip(values, shape, strict=True))
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise invalid_cursor(param) from None


def one_cursor(cursor: str | None, *, alias: tuple[str, str | None]) -> str | None:
    """`cursor`, or the value of its deprecated alias `alias = (name, value)`; not both."""
    name, value = alias
    if value is None:
        return cursor
    if cursor is not None:
        raise InvalidRequest(
            f"`{name}` is the old name of `cursor`: pass one of them",
            [FieldError(path=f"query.{name}", message="given with `cursor`", type="cursor")],
        )
    return value
