"""Client receipts: the app on the device confirms a push arrived (or was read).

Push providers report no delivery, so the app posts to `POST /v1/messages/{id}/receipts`,
authenticated by the message's receipt token (sent in the push payload) or an API key.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field

from app.auth.dependencies import bearer
from app.auth.receipts import ReceiptTokenRefused, check_receipt_token
from app.auth.service import Scope, authenticate
from app.cascade.service import record_status
from app.errors import PROBLEM_RESPONSES, InvalidReceiptToken, NotFound, Unauthorized
from app.ids import IdPrefix, from_public, to_public
from app.ledger import repository as ledger
from app.runtime import Runtime, get_runtime, utcnow
from providers.base import Channel, ReceiptStatus, StatusUpdate

router = APIRouter(prefix="/v1/messages", tags=["messages"], responses=PROBLEM_RESPONSES)


class ClientReceiptStatus(StrEnum):
    DELIVERED = "delivered"
    READ = "read"
    CHECKED = "checked"  # opened/acted on: counts as read


class ClientReceipt(BaseModel):
    status: ClientReceiptStatus
    attempt: str | None = Field(
        default=None, description="The push attempt (`att_…`); default: the latest push step."
    )


class ReceiptResult(BaseModel):
    applied: bool


@router.post(
    "/{message_id}/receipts",
    summary="Confirm from the device that a push arrived (or was read)",
)
async def post_receipt(
    message_id: str,
    body: ClientReceipt,
    receipt_token_header: Annotated[
        str | None,
        Header(
            alias="X-Receipt-Token",
            description="The token from the push payload (`receipt_token`):"
            " `rct1.<key id>.<mac>`, bound to this message.",
        ),
    ] = None,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    runtime: Runtime = Depends(get_runtime),
) -> ReceiptResult:
    tenant_id = None
    if receipt_token_header is not None:
        try:
            check_receipt_token(
                runtime.settings.receipt_signing_keys, message_id, receipt_token_header
            )
        except ReceiptTokenRefused as refused:
            raise InvalidReceiptToken(str(refused)) from None
    elif credentials is not None:
        pepper = runtime.settings.api_key_pepper.get_secret_value()
        async with runtime.engine.connect() as conn:
            principal = await authenticate(conn, pepper, credentials.credentials)
        if principal is None or not (principal.scopes & {Scope.SEND, Scope.ADMIN}):
            raise Unauthorized("the API key is unknown, revoked or lacks the send scope")
        tenant_id = principal.tenant_id
    else:
        raise Unauthorized("send X-Receipt-Token or an API key")

    uid = from_public(IdPrefix.MESSAGE, message_id)
    async with runtime.transaction() as tx:
        message = await ledger.get_message(tx.conn, uid, tenant_id) if uid else None
        if message is None:
            raise NotFound(f"no message {message_id}")
        attempts = [
            a
            for a in await ledger.list_attempts(tx.conn, message.id)
            if a.channel == Channel.PUSH
            and (body.attempt is None or to_public(IdPrefix.ATTEMPT, a.id) == body.attempt)
        ]
        if not attempts:
            raise NotFound("no push attempt for this message")
        attempt = attempts[-1]
        status = (
            ReceiptStatus.DELIVERED
            if body.status is ClientReceiptStatus.DELIVERED
            else ReceiptStatus.READ
        )
        applied = await record_status(
            tx,
            attempt.provider,
            StatusUpdate(
                status=status,
                event_id=f"receipt:{to_public(IdPrefix.ATTEMPT, attempt.id)}:{body.status.value}",
                attempt_id=to_public(IdPrefix.ATTEMPT, attempt.id),
            ),
            utcnow(),
        )
    return ReceiptResult(applied=applied)
