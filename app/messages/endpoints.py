"""HTTP for messages: parse, call the service, shape the response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import Scope as AsgiScope

from app.auth.dependencies import admit, known_principal, require
from app.auth.service import Principal, Scope
from app.cascade.machine import MessageStatus
from app.errors import PROBLEM_MEDIA_TYPE, PROBLEM_RESPONSES, Problem, error_response
from app.hotpath import JSONBytes
from app.input_checks import UtcDateTime
from app.messages import batch, service
from app.messages.listing import MAX_LIMIT, MessageFilter, list_messages, parse_metadata_filters
from app.messages.schemas import (
    AcceptedMessage,
    BatchResult,
    MessagePage,
    MessageView,
    SendBatchRequest,
    SendMessageRequest,
)
from app.observability import count_accepted
from app.pagination import CursorParam
from app.runtime import Runtime, get_runtime, utcnow
from providers.base import Category, Channel

router = APIRouter(prefix="/v1/messages", tags=["messages"], responses=PROBLEM_RESPONSES)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Same key and body return the original response; a different body is 409.",
    ),
]


@router.post("", status_code=202, summary="Send a message through a channel cascade")
async def send_message(
    body: SendMessageRequest,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    principal: Principal = Depends(require(Scope.SEND)),
    runtime: Runtime = Depends(get_runtime),
) -> AcceptedMessage:
    acceptance = await runtime.accept_writer.accept(
        principal.tenant_id,
        body,
        idempotency_key,
        runtime.providers,
        runtime.settings,
        utcnow(),
    )
    if acceptance.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        count_accepted(body.category)
    return acceptance.message


async def send_message_fast(scope: AsgiScope, body: bytes, runtime: Runtime) -> Response | None:
    """`send_message` for the plain case, without the framework (see `app/hotpath.py`):
    None when the route must answer (an unknown key, a body or header that does not
    validate), so every refusal keeps the route's exact answer."""
    content_type = authorization = key = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"authorization":
            authorization = value
        elif name == b"idempotency-key":
            if key is not None:
                return None
            key = value
    if content_type is None or not content_type.startswith(b"application/json"):
        return None
    principal = known_principal(runtime, authorization)
    if principal is None:
        return None
    idempotency_key = None
    if key is not None:
        idempotency_key = key.decode("latin-1")
        if not 1 <= len(idempotency_key) <= 255:
            return None
    try:
        request = SendMessageRequest.model_validate_json(body)
    except ValueError:
        return None
    try:
        await admit(runtime, principal, Scope.SEND)
        acceptance = await runtime.accept_writer.accept(
            principal.tenant_id,
            request,
            idempotency_key,
            runtime.providers,
            runtime.settings,
            utcnow(),
        )
    except Exception as exc:
        return error_response(exc)
    if acceptance.replayed:
        headers = REPLAYED
    else:
        headers = None
        count_accepted(request.category)
    return JSONBytes(_ACCEPTED_JSON(acceptance.message), 202, headers)


_ACCEPTED_JSON = AcceptedMessage.__pydantic_serializer__.to_json
REPLAYED = {"Idempotent-Replayed": "true"}


@router.get("/{message_id}", summary="A message with its attempts and event timeline")
async def get_message(
    message_id: str,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> MessageView:
    async with runtime.transaction() as tx:
        return await service.get_message_view(tx, principal.tenant_id, message_id)


@router.get("", summary="Search messages, newest first, with cursor pagination")
async def search_messages(
    status: Annotated[
        list[MessageStatus] | None, Query(description="Any of these statuses (repeatable).")
    ] = None,
    category: Category | None = None,
    channel: Annotated[
        Channel | None, Query(description="The channel it was delivered on.")
    ] = None,
    provider: Annotated[
        str | None, Query(max_length=40, description="A provider in the message's cascade.")
    ] = None,
    to: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=4096,
            description="A recipient address, exact: E.164 phone, email (any case), push token,"
            " chat id.",
        ),
    ] = None,
    created_after: Annotated[UtcDateTime | None, Query(description="Inclusive.")] = None,
    created_before: Annotated[UtcDateTime | None, Query(description="Exclusive.")] = None,
    metadata: Annotated[
        list[str] | None, Query(description="`key=value`, repeatable: all must match.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: CursorParam = None,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> MessagePage:
    wanted = MessageFilter(
        statuses=tuple(status or ()),
        category=category,
        delivered_channel=channel,
        provider=provider,
        to=to,
        created_after=created_after,
        created_before=created_before,
        metadata=parse_metadata_filters(metadata or []),
    )
    async with runtime.engine.connect() as conn:
        return await list_messages(conn, principal.tenant_id, wanted, limit, cursor)


@router.post(
    "/batch",
    status_code=202,
    summary="Send up to 1000 messages sharing defaults, with a result per message",
    response_model=BatchResult,
    response_model_exclude_none=True,
    responses={
        207: {
            "model": BatchResult,
            "description": "Some messages were accepted, others not: see each `problem`",
        },
        422: {"description": "No message could be accepted (or the batch itself is invalid)"},
    },
)
async def send_batch(
    body: SendBatchRequest,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    principal: Principal = Depends(require(Scope.SEND)),
    runtime: Runtime = Depends(get_runtime),
) -> JSONResponse:
    async with runtime.transaction() as tx:
        acceptance = await batch.accept_batch(
            tx,
            principal.tenant_id,
            body,
            await request.body(),
            idempotency_key,
            runtime.providers,
            runtime.settings,
            utcnow(),
        )
    if not acceptance.replayed:
        for _ in range(acceptance.result.accepted):
            count_accepted(body.category)
    return JSONResponse(
        acceptance.result.model_dump(mode="json", exclude_none=True),
        status_code=acceptance.status_code,
        headers={"Idempotent-Replayed": "true"} if acceptance.replayed else None,
    )


@router.post(
    "/{message_id}/cancel",
    summary="Cancel a message before it is delivered (409 once it has ended)",
    responses={
        409: {
            "model": Problem,
            "content": {PROBLEM_MEDIA_TYPE: {}},
            "description": "The message has already ended",
        }
    },
)
async def cancel_message(
    message_id: str,
    principal: Principal = Depends(require(Scope.SEND)),
    runtime: Runtime = Depends(get_runtime),
) -> MessageView:
    async with runtime.transaction() as tx:
        return await service.cancel_message(tx, principal.tenant_id, message_id, utcnow())
