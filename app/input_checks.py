"""Checks every request passes before its endpoint sees it: strings Postgres cannot store
(a NUL character) and times UTC cannot hold.

A NUL is refused for the whole request, path, query and body alike, before parsing, like
a body over the size limit or malformed JSON (a batch too: it is bytes no message can
hold, not one item's invalid field). Times are a field type, so that a batch item with one
is refused in its own result.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from pydantic import AfterValidator, AwareDatetime
from starlette.types import ASGIApp, Receive, Scope, Send

from app.asgi import read_body, replay_body
from app.errors import FieldError, InvalidRequest, field_path, problem_response

NUL = "\x00"
NUL_MESSAGE = "contains a NUL character (\\u0000), which cannot be stored"
# Cheap tests on the raw bytes; only a hit is parsed to name the field.
_JSON_NUL = b"\\u0000"
_FORM_NUL = b"%00"
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def fits_in_utc(value: datetime) -> datetime:
    """`value` if it can be written in UTC (`9999-12-31T23:59:59-12:00` cannot)."""
    if value.tzinfo is not None:
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise ValueError("the time is out of range once converted to UTC") from None
    return value


UtcDateTime = Annotated[AwareDatetime, AfterValidator(fits_in_utc)]


def nul_errors(value: Any, loc: tuple[int | str, ...]) -> Iterator[FieldError]:
    """A field error for each string or key holding a NUL in a parsed JSON value."""
    if isinstance(value, str):
        if NUL in value:
            yield FieldError(path=field_path(loc), message=NUL_MESSAGE, type="nul_character")
    elif isinstance(value, dict):
        for key, item in value.items():
            if NUL in key:
                yield FieldError(
                    path=field_path(loc),
                    message=f"the key {key!r} {NUL_MESSAGE}",
                    type="nul_character",
                )
            yield from nul_errors(item, (*loc, key.replace(NUL, "")))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from nul_errors(item, (*loc, index))


def _pairs_errors(pairs: list[tuple[str, str]], where: str) -> Iterator[FieldError]:
    for name, value in pairs:
        if NUL in name or NUL in value:
            yield FieldError(
                path=field_path((where, name.replace(NUL, ""))),
                message=NUL_MESSAGE,
                type="nul_character",
            )


def _body_errors(body: bytes, content_type: bytes) -> list[FieldError]:
    if content_type.startswith(b"application/x-www-form-urlencoded"):
        if _FORM_NUL not in body and b"\x00" not in body:
            return []
        pairs = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        return list(_pairs_errors(pairs, "body"))
    if _JSON_NUL not in body:
        return []
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []  # not JSON: the endpoint's own parsing answers
    return list(nul_errors(parsed, ("body",)))


class RefuseNulCharacters:
    """422 naming every path, query parameter or body field that holds a NUL."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        errors: list[FieldError] = []
        if NUL in scope["path"]:
            errors.append(FieldError(path="path", message=NUL_MESSAGE, type="nul_character"))
        query: bytes = scope.get("query_string", b"")
        if _FORM_NUL in query or b"\x00" in query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            errors += _pairs_errors(pairs, "query")
        if scope["method"] not in _METHODS_WITH_BODY:
            await self._answer(errors, scope, receive, send)
            return
        body, rest = await read_body(receive)
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        errors += _body_errors(body, content_type)
        await self._answer(errors, scope, replay_body(body, receive, rest), send)

    async def _answer(
        self, errors: list[FieldError], scope: Scope, receive: Receive, send: Send
    ) -> None:
        if not errors:
            await self.app(scope, receive, send)
            return
        refusal = InvalidRequest(detail=f"{len(errors)} field error(s)", errors=errors)
        await problem_response(refusal.problem())(scope, receive, send)
