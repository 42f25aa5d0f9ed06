"""HTTP for the event feed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.auth.dependencies import require
from app.auth.service import Principal, Scope
from app.errors import PROBLEM_RESPONSES
from app.ops.events.schemas import EventPage
from app.ops.events.service import read_feed
from app.pagination import MAX_CURSOR_LENGTH, one_cursor
from app.runtime import Runtime, get_runtime, utcnow
from providers.base import Category

router = APIRouter(prefix="/v1/events", tags=["events"], responses=PROBLEM_RESPONSES)


@router.get("", summary="The tenant's message events, oldest first, to poll with a cursor")
async def list_events(
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_CURSOR_LENGTH,
            description="The previous `next_cursor`; omit for the latest.",
        ),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_CURSOR_LENGTH,
            deprecated=True,
            description="The old name of `cursor`, accepted until the next release.",
        ),
    ] = None,
    category: Annotated[list[Category] | None, Query(description="Repeatable.")] = None,
    status: Annotated[
        list[str] | None, Query(description="Event status, e.g. `failed` (repeatable).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> EventPage:
    """Events become visible about a second after they happen (see `next_cursor`)."""
    async with runtime.engine.connect() as conn:
        return await read_feed(
            conn,
            principal.tenant_id,
            cursor=one_cursor(cursor, alias=("after", after)),
            limit=limit,
            categories={c.value for c in category or ()},
            statuses=set(status or ()),
            now=utcnow(),
        )
