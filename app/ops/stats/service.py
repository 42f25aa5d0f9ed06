"""Delivery stats from rollups: bumped once per message when it reaches a final status.

The write is one upsert of the minute, hour and day rows, part of the very statement that
finalises the message (`ledger.write_changes`), so the rollups never disagree with the
ledger. Reads add up the
rows of one resolution over a range; they never scan `messages`.
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app import observability
from app.cascade.machine import FINAL_MESSAGE, Decision, MessageStatus
from app.errors import FieldError, InvalidRequest
from app.ledger.repository import AttemptRow, MessageRow
from app.ops.stats.latency import SLOTS, add_histograms, one_hot, percentile
from app.ops.stats.schemas import (
    Bucket,
    CategoryView,
    CountView,
    LatencyView,
    SeriesPoint,
    StatsView,
    StepView,
)
from app.ops.stats.tables import stats_rollups
from providers.base import Category

# Concurrent finalisations in the same minute spread over this many rows per key.
SHARDS = 4
# Bounds the rows one read adds up (buckets x dimensions x shards).
MAX_RANGE = {
    Bucket.MINUTE: timedelta(days=1),
    Bucket.HOUR: timedelta(days=31),
    Bucket.DAY: timedelta(days=1100),
}


@functools.lru_cache(maxsize=256)
def truncate(at: datetime, bucket: Bucket) -> datetime:
    """The start of `at`'s bucket (UTC). Cached: a group commit finalises many messages at
    one `at`, each with a row per bucket."""
    at = at.astimezone(UTC)
    if bucket is Bucket.MINUTE:
        return at.replace(second=0, microsecond=0)
    if bucket is Bucket.HOUR:
        return at.replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Rollup:
    """The rollup rows (minute, hour, day) for one message reaching a final status, written
    by the statement that finalises the message (`ledger.write_changes`)."""

    rows: list[dict[str, Any]]
    category: str
    channel: str
    status: str

    def counted(self) -> None:
        observability.count_message_finished(self.category, self.channel, self.status)


def final_status_rollup(
    message: MessageRow,
    status: MessageStatus,
    step: int,
    at: datetime,
    cost: Decimal | None = None,
    *,
    count: int = 1,
    delivered_at: datetime | None = None,
) -> Rollup:
    """Count a message that just reached final `status` on cascade step `step`: write it
    exactly once per message, in the transaction that sets the final status. `count=-1`
    takes back how it was counted before (a failed message revived by a late delivery).
    `delivered_at`: when it was delivered, if not `at` (an email accepted at `sent_at` and
    delivered when its bounce window closed)."""
    latency_ms = (
        max(0, int(((delivered_at or at) - message.created_at).total_seconds() * 1000))
        if status is MessageStatus.DELIVERED
        else None
    )
    hist = one_hot(latency_ms)
    channel = str(message.cascade[step]["channel"]) if 0 <= step < len(message.cascade) else ""
    row = {
        "tenant_id": message.tenant_id,
        "category": message.category,
        "channel": channel,
        "status": status.value,
        "step": step,
        "shard": message.id.int % SHARDS,
        "messages": count,
        "latency_ms_sum": count * (latency_ms or 0),
        "latency_hist": hist if count == 1 else [count * n for n in hist],
        "cost": cost,
    }
    rows = [{**row, "resolution": b.value, "bucket": truncate(at, b)} for b in Bucket]
    return Rollup(rows, message.category, channel, status.value)


def observe_outcome(
    message: MessageRow,
    attempt: AttemptRow,
    decision: Decision,
    *,
    source: str,
    at: datetime,
) -> Rollup | None:
    """Metrics and log context for one signal the cascade just applied, and the rollup to
    write with it when it finalises the message."""
    observability.bind_message(message.id, message.tenant_id, message.category, attempt.id)
    if decision.attempt_status != attempt.status:
        observability.observe_attempt(
            category=message.category,
            channel=attempt.channel,
            provider=attempt.provider,
            before=attempt.status,
            after=decision.attempt_status,
            source=source,
            claimed_at=attempt.updated_at,
            sent_at=attempt.sent_at,
            at=at,
        )
    if decision.message_status != message.status and decision.message_status in FINAL_MESSAGE:
        step = attempt.step if decision.delivered_step is None else decision.delivered_step
        # Delivered as its window closed: the time to deliver is the time to acceptance.
        window_closed = source == "timeout" and decision.message_status is MessageStatus.DELIVERED
        rollup = final_status_rollup(
            message,
            decision.message_status,
            step,
            at,
            delivered_at=attempt.sent_at if window_closed else None,
        )
        if message.status in FINAL_MESSAGE and message.completed_at is not None:
            # Revived (a late delivery of a failed message): it moves to its new status,
            # out of the one it was counted in, so each message counts once.
            was = message.current_step
            if message.delivered_step is not None:
                was = message.delivered_step
            before = final_status_rollup(
                message, message.status, was, message.completed_at, count=-1
            )
            rollup = replace(rollup, rows=rollup.rows + before.rows)
        return rollup
    return None


@dataclass
class _Totals:
    messages: int = 0
    delivered: int = 0
    later: int = 0
    latency_ms_sum: int = 0
    cost: Decimal | None = None

    def __post_init__(self) -> None:
        self.hist = [0] * SLOTS

    def latency(self) -> LatencyView:
        return LatencyView(
            delivered=self.delivered,
            mean_ms=self.latency_ms_sum / self.delivered if self.delivered else None,
            median_ms=percentile(self.hist, 0.5),
            p95_ms=percentile(self.hist, 0.95),
        )

    def failover_rate(self) -> float | None:
        return self.later / self.delivered if self.delivered else None


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


async def read_stats(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    start: datetime,
    end: datetime,
    bucket: Bucket,
    category: Category | None = None,
) -> StatsView:
    if end <= start:
        raise InvalidRequest(
            "`to` must be after `from`",
            [FieldError(path="query.to", message="must be after `from`", type="range")],
        )
    if end - start > MAX_RANGE[bucket]:
        raise InvalidRequest(
            f"{bucket.value} buckets cover at most {MAX_RANGE[bucket].days or 1} day(s)",
            [FieldError(path="query.bucket", message="range too long", type="range")],
        )
    r = stats_rollups.c
    conditions = [
        r.tenant_id == tenant_id,
        r.resolution == bucket.value,
        r.bucket >= truncate(start, bucket),
        r.bucket < end,
    ]
    if category is not None:
        conditions.append(r.category == category.value)
    rows = await conn.execute(
        select(
            r.bucket,
            r.category,
            r.channel,
            r.status,
            r.step,
            func.sum(r.messages).label("messages"),
            func.sum(r.latency_ms_sum).label("latency_ms_sum"),
            func.sum(r.cost).label("cost"),
        )
        .where(*conditions)
        .group_by(r.bucket, r.category, r.channel, r.status, r.step)
        .order_by(r.bucket, r.category, r.channel, r.status, r.step)
    )
    # Histograms are added up here: unnesting them in SQL costs more than the transfer.
    hist_rows = await conn.execute(
        select(r.category, r.latency_hist).where(
            *conditions, r.status == MessageStatus.DELIVERED.value
        )
    )
    return _summarise(start, end, bucket, list(rows), list(hist_rows))


def _summarise(
    start: datetime, end: datetime, bucket: Bucket, rows: list[Any], hist_rows: list[Any]
) -> StatsView:
    overall = _Totals()
    per_category: dict[str, _Totals] = defaultdict(_Totals)
    by_status: dict[str, int] = defaultdict(int)
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    ended: dict[int, int] = defaultdict(int)
    delivered_at: dict[int, int] = defaultdict(int)
    # The rows are split by step too (for the funnel); the series shows one per key.
    series: dict[tuple[datetime, str, str, str], int] = defaultdict(int)
    for row in rows:
        n = int(row.messages)
        series[(row.bucket, row.category, row.channel, row.status)] += n
        counts[(row.category, row.channel, row.status)] += n
        by_status[row.status] += n
        ended[row.step] += n
        delivered = row.status == MessageStatus.DELIVERED.value
        for totals in (overall, per_category[row.category]):
            totals.messages += n
            if delivered:
                totals.delivered += n
                totals.later += n if row.step > 0 else 0
                totals.latency_ms_sum += int(row.latency_ms_sum)
            if row.cost is not None:
                totals.cost = (totals.cost or Decimal(0)) + row.cost
        if delivered:
            delivered_at[row.step] += n
    for hist_row in hist_rows:
        add_histograms(per_category[hist_row.category].hist, hist_row.latency_hist)
    for totals in per_category.values():
        add_histograms(overall.hist, totals.hist)

    steps = []
    reached = overall.messages
    for step in range(max(ended, default=-1) + 1):
        steps.append(
            StepView(
                step=step,
                reached=reached,
                delivered=delivered_at[step],
                ended=ended[step],
                delivery_rate=_ratio(delivered_at[step], reached),
            )
        )
        reached -= ended[step]
    return StatsView(
        start=start,
        end=end,
        bucket=bucket,
        messages=overall.messages,
        # A revived message's first status nets to 0 (see `observe_outcome`): not shown.
        by_status={status: n for status, n in by_status.items() if n},
        failover_rate=overall.failover_rate(),
        time_to_deliver=overall.latency(),
        counts=[
            CountView(category=Category(c), channel=ch, status=s, messages=n)
            for (c, ch, s), n in sorted(counts.items())
            if n
        ],
        series=[
            SeriesPoint(bucket=at, category=c, channel=ch, status=st, messages=n)
            for (at, c, ch, st), n in series.items()
            if n
        ],
        steps=steps,
        by_category=[
            CategoryView(
                category=Category(name),
                messages=t.messages,
                delivered=t.delivered,
                delivered_on_later_step=t.later,
                failover_rate=t.failover_rate(),
                time_to_deliver=t.latency(),
                cost=t.cost,
            )
            for name, t in sorted(per_category.items())
        ],
    )
