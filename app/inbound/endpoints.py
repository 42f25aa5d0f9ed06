"""HTTP for one recipient's timeline: messages, attempts and replies, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from app.auth.dependencies import require
from app.auth.service import Principal, Scope
from app.errors import PROBLEM_RESPONSES
from app.inbound.schemas import Timeline
from app.inbound.timeline import recipient_timeline
from app.messages.listing import MAX_LIMIT
from app.pagination import CursorParam
from app.runtime import Runtime, get_runtime
from providers.base import Channel

router = APIRouter(tags=["recipients"], responses=PROBLEM_RESPONSES)


@router.get(
    "/v1/recipients/{address}/timeline",
    summary="One recipient's messages, attempts and replies across channels, newest first",
)
async def get_timeline(
    address: Annotated[
        str,
        Path(
            min_length=1,
            max_length=320,
            description="A phone (E.164), email, chat or subscriber id, push token",
        ),
    ],
    channel: Annotated[
        Channel | None,
        Query(description="Only this channel: its recipient fields and its replies"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: CursorParam = None,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> Timeline:
    async with runtime.engine.connect() as conn:
        return await recipient_timeline(conn, principal.tenant_id, address, channel, limit, cursor)
