"""Domain errors and their one mapping to RFC 9457 `application/problem+json`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import InterfaceError, OperationalError
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


class Forbidden(ProblemError):
    status, slug, title = 403, "forbidden", "The API key lacks the scope for this operation"


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "No such resource"


class Conflict(ProblemError):
    status, slug, title = 409, "conflict", "Conflicts with an earlier request"


class PayloadTooLarge(ProblemError):
    status, slug, title = 413, "payload-too-large", "The body is too large"


class Unavailable(ProblemError):
    status, slug, title = 503, "unavailable", "A backing service is unavailable; retry later"


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _field_path(loc: Sequence[int | str]) -> str:
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
                path=_field_path(err.get("loc", ())),
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
        return problem_response(exc.problem())

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

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(ConnectionError)
    @app.exception_handler(OSError)
    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("backing_service_unavailable", error=repr(exc))
        return problem_response(Unavailable(detail="database or queue unreachable").problem())

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", exc_info=exc)
        problem = Problem(type=PROBLEM_BASE + "internal", title="Internal error", status=500)
        return problem_response(problem)


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": description}
    for status, description in {
        400: "Malformed request",
        401: "Missing or invalid credentials",
        404: "Not found",
        413: "Body too large",
        422: "Invalid request",
        503: "Backing service unavailable",
    }.items()
}
