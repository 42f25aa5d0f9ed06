"""Domain errors and their one mapping to RFC 9457 `application/problem+json`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import structlog
from asyncpg.exceptions import (
    InterfaceError as PgInterfaceError,
)
from asyncpg.exceptions import (
    InternalClientError,
    OperatorInterventionError,
    PostgresConnectionError,
    PostgresError,
)
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://cascade.dev/problems/"

log = structlog.get_logger()


class FieldError(BaseModel):
    path: str
    message: str
    type: str


class Problem(BaseModel):
    """The one error shape every endpoint answers with."""

    type: str
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] = []


class ProblemError(Exception):
    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str | None = None, errors: Sequence[FieldError] = ()) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.errors = list(errors)

    def headers(self) -> dict[str, str]:
        return {}

    def problem(self) -> Problem:
        return Problem(
            type=PROBLEM_BASE + self.slug,
            title=self.title,
            status=self.status,
            detail=self.detail,
            errors=self.errors,
        )


class InvalidRequest(ProblemError):
    status, slug, title = 422, "invalid-request", "The request is not valid"


class MalformedBody(ProblemError):
    status, slug, title = 400, "malformed-body", "The body is not valid JSON"


class Unauthorized(ProblemError):
    status, slug, title = 401, "unauthorized", "Missing or invalid API key"


class InvalidReceiptToken(ProblemError):
    """A device's receipt whose `X-Receipt-Token` is not the one its push carried."""

    status, slug, title = 401, "invalid-receipt-token", "Invalid receipt token"


class Forbidden(ProblemError):
    status, slug, title = 403, "forbidden", "The API key lacks the scope for this operation"


class InvalidProviderSignature(ProblemError):
    """A provider callback whose own signature (not an API key) does not verify."""

    status, slug, title = 401, "invalid-signature", "Invalid or missing provider signature"


class InvalidVerifyToken(ProblemError):
    """A provider's callback URL handshake (WhatsApp's `hub.verify_token`) refused."""

    status, slug, title = 403, "invalid-verify-token", "Invalid or missing verify token"


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "No such resource"


class Conflict(ProblemError):
    status, slug, title = 409, "conflict", "Conflicts with an earlier request"


class PayloadTooLarge(ProblemError):
    status, slug, title = 413, "payload-too-large", "The body is too large"


class TooManyRequests(ProblemError):
    status, slug, title = 429, "too-many-requests", "Too many requests for this API key"

    def __init__(self, retry_after: float) -> None:
        self.retry_after_seconds = max(1, math.ceil(retry_after))
        super().__init__(f"retry after {self.retry_after_seconds} s")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class Unavailable(ProblemError):
    status, slug, title = 503, "unavailable", "A backing service is unavailable; retry later"


def problem_types_table() -> str:
    """Every problem `type` the API answers with, as a Markdown table (for the API docs)."""
    rows = {
        (error.status, error.slug, error.title)
        for error in (
            InvalidRequest,
            MalformedBody,
            Unauthorized,
            InvalidProviderSignature,
            InvalidReceiptToken,
            Forbidden,
            InvalidVerifyToken,
            NotFound,
            Conflict,
            PayloadTooLarge,
            TooManyRequests,
            Unavailable,
        )
    }
    rows |= {(status, slug, title) for status, (slug, title) in _STATUS_TITLES.items()}
    rows.add((500, "internal", "Internal error"))
    lines = ["| status | type | title |", "|---|---|---|"]
    lines += [f"| {status} | `{slug}` | {title} |" for status, slug, title in sorted(rows)]
    return "\n".join(lines)


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def field_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def validation_problem(exc: RequestValidationError) -> ProblemError:
    errors: list[dict[str, Any]] = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return MalformedBody(detail=str(errors[0].get("ctx", {}).get("error", "invalid JSON")))
    return InvalidRequest(
        detail=f"{len(errors)} field error(s)",
        errors=[
            FieldError(
                path=field_path(err.get("loc", ())),
                message=str(err.get("msg", "")),
                type=str(err.get("type", "")),
            )
            for err in errors
        ],
    )


_STATUS_TITLES = {
    404: ("not-found", "No such resource"),
    405: ("method-not-allowed", "Method not allowed"),
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.problem(), headers=exc.headers() or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(exc).problem())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug, title = _STATUS_TITLES.get(exc.status_code, ("http-error", "HTTP error"))
        problem = Problem(
            type=PROBLEM_BASE + slug, title=title, status=exc.status_code, detail=str(exc.detail)
        )
        return problem_response(problem, headers=dict(exc.headers or {}))

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(PostgresError)
    @app.exception_handler(PgInterfaceError)
    @app.exception_handler(InternalClientError)
    @app.exception_handler(RedisError)
    @app.exception_handler(OSError)
    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)


def error_response(exc: Exception) -> JSONResponse:
    """Any exception as its problem: a domain error's own, 503 for a backing service that
    cannot be reached, otherwise a logged 500."""
    if isinstance(exc, ProblemError):
        return problem_response(exc.problem(), headers=exc.headers() or None)
    if is_unavailable(exc):
        log.warning("backing_service_unavailable", error=repr(exc))
        return problem_response(Unavailable(detail="database or queue unreachable").problem())
    log.exception("unhandled_error", exc_info=exc)
    problem = Problem(type=PROBLEM_BASE + "internal", title="Internal error", status=500)
    return problem_response(problem)


# How a lost or restarting Postgres or Redis shows up, raw or wrapped by SQLAlchemy: socket
# errors, asyncpg's connection and shutdown errors ("the database system is shutting
# down"), a protocol left mid-operation by a dropped connection, pool and Redis timeouts.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    PostgresConnectionError,
    OperatorInterventionError,
    PgInterfaceError,
    InternalClientError,
    RedisConnectionError,
    RedisTimeoutError,
)


# Deadlock detected, serialization failure: the same transaction may well pass again.
_LOCK_CONFLICTS = frozenset({"40P01", "40001"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every error it wraps (the driver's `orig`, causes, contexts), once each."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        if isinstance(error, DBAPIError):
            pending.append(error.orig)
        pending += [error.__cause__, error.__context__]


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is Postgres refusing a transaction for a conflict
    with a concurrent one, rather than for what it does."""
    return any(getattr(error, "sqlstate", None) in _LOCK_CONFLICTS for error in _chain(exc))


def is_database_error(exc: BaseException | None) -> bool:
    """An error Postgres (or the way to it) raised, not one of ours: retrying may work."""
    return isinstance(exc, DBAPIError | PostgresError | PoolTimeoutError) or (
        exc is not None and is_unavailable(exc)
    )


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc`, or an error it wraps, means Postgres or Redis could not be reached."""
    return any(
        isinstance(error, _UNAVAILABLE)
        or (isinstance(error, DBAPIError) and error.connection_invalidated)
        for error in _chain(exc)
    )


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": description}
    for status, description in {
        400: "Malformed request",
        401: "Missing or invalid credentials",
        403: "The API key lacks the scope",
        404: "Not found",
        409: "Conflicts with an earlier request (e.g. the same Idempotency-Key, another body)",
        413: "Body too large",
        422: "Invalid request",
        429: "Too many requests for this API key; see Retry-After",
        503: "Backing service unavailable",
    }.items()
}
PROBLEM_RESPONSES[429]["headers"] = {
    "Retry-After": {"description": "Seconds until the key may retry", "schema": {"type": "integer"}}
}
# Provider callbacks are refused for the provider's own credentials, never an API key's.
CALLBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{status: r for status, r in PROBLEM_RESPONSES.items() if status != 403},
    401: {
        **PROBLEM_RESPONSES[401],
        "description": f"{InvalidProviderSignature.title} (`{InvalidProviderSignature.slug}`)",
    },
}
HANDSHAKE_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: {
        **PROBLEM_RESPONSES[403],
        "description": f"{InvalidVerifyToken.title} (`{InvalidVerifyToken.slug}`)",
    },
}
