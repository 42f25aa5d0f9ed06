"""HTTP for messages: parse, call the service, shape the response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response

from app.auth.dependencies import get_runtime, require
from app.auth.service import Principal, Scope
from app.errors import PROBLEM_RESPONSES
from app.messages import service
from app.messages.schemas import AcceptedMessage, MessageView, SendMessageRequest
from app.runtime import Runtime, utcnow

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
    async with runtime.transaction() as tx:
        acceptance = await service.accept_message(
            tx,
            principal.tenant_id,
            body,
            idempotency_key,
            runtime.providers,
            runtime.settings,
            utcnow(),
        )
    if acceptance.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return acceptance.message


@router.get("/{message_id}", summary="A message with its attempts and event timeline")
async def get_message(
    message_id: str,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> MessageView:
    async with runtime.transaction() as tx:
        return await service.get_message_view(tx, principal.tenant_id, message_id)
