"""HTTP for delivery stats."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.auth.dependencies import require
from app.auth.service import Principal, Scope
from app.errors import PROBLEM_RESPONSES
from app.input_checks import UtcDateTime
from app.ops.stats.schemas import Bucket, StatsView
from app.ops.stats.service import read_stats
from app.runtime import Runtime, get_runtime, utcnow
from providers.base import Category

router = APIRouter(prefix="/v1/stats", tags=["stats"], responses=PROBLEM_RESPONSES)


@router.get(
    "",
    summary="Delivery stats: counts, delivery rate per step, time to deliver, failover",
    response_model_by_alias=True,
)
async def get_stats(
    start: Annotated[
        UtcDateTime | None,
        Query(alias="from", description="Default: one day (bucket `day`: 30 days) before `to`."),
    ] = None,
    end: Annotated[UtcDateTime | None, Query(alias="to", description="Default: now.")] = None,
    bucket: Bucket = Bucket.HOUR,
    category: Category | None = None,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> StatsView:
    """Messages that reached a final status in [`from`, `to`), counted when they did.

    Ranges start at a bucket boundary (UTC); minute buckets cover at most a day, hour
    buckets 31 days.
    """
    end = end or utcnow()
    start = start or end - (timedelta(days=30) if bucket is Bucket.DAY else timedelta(days=1))
    async with runtime.engine.connect() as conn:
        return await read_stats(
            conn, principal.tenant_id, start, end, bucket, category, runtime.providers.currency
        )
