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
    ChannelView,
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
    counted: bool = True  # False: a correction of amounts, no message finished

    def committed(self) -> None:
        if self.counted:
            observability.count_message_finished(self.category, self.channel, self.status)


class _Ledger:
    """Marks an amount taken from the message row as it is."""


LEDGER = _Ledger()
# A message's total cost as a change gives it: known, unknown, or the ledger's as it is.
TotalCost = Decimal | None | _Ledger


@dataclass(frozen=True, slots=True)
class _CostFields:
    cost: Decimal | None
    priced: int
    fallback_cost: Decimal | None

    def minus(self, other: _CostFields) -> _CostFields:
        def sub(a: Decimal | None, b: Decimal | None) -> Decimal | None:
            return None if a is None and b is None else (a or Decimal(0)) - (b or Decimal(0))

        return _CostFields(
            sub(self.cost, other.cost),
            self.priced - other.priced,
            sub(self.fallback_cost, other.fallback_cost),
        )


def _cost_fields(
    total: Decimal | None, fallback: Decimal | None, delivered: bool, count: int
) -> _CostFields:
    """A message's part in its rollup row's amounts: its cost when known (`priced`), and,
    delivered, what its last step would have cost (its own cost when that is unpriced:
    no saving claimed)."""
    if total is None:
        return _CostFields(None, 0, None)
    compared = (fallback if fallback is not None else total) if delivered else None
    return _CostFields(count * total, count, None if compared is None else count * compared)


def final_status_rollup(
    message: MessageRow,
    status: MessageStatus,
    step: int,
    at: datetime,
    *,
    count: int = 1,
    delivered_at: datetime | None = None,
    cost: TotalCost = LEDGER,
    amounts: _CostFields | None = None,
) -> Rollup:
    """Count a message that just reached final `status` on cascade step `step`: write it
    exactly once per message, in the transaction that sets the final status. `count=-1`
    takes back how it was counted before (a failed message revived by a late delivery);
    `count=0` with `amounts` corrects the amounts of a counted message.
    `delivered_at`: when it was delivered, if not `at` (an email accepted at `sent_at` and
    delivered when its bounce window closed). `cost`: the message's total, if not
    `message.cost` (this very change prices an attempt)."""
    latency_ms = (
        max(0, int(((delivered_at or at) - message.created_at).total_seconds() * 1000))
        if status is MessageStatus.DELIVERED and count
        else None
    )
    hist = one_hot(latency_ms)
    if amounts is None:
        # From the ledger: unknown once sent unpriced, else its known cost (none sent: 0).
        known = None if message.unpriced else (message.cost or Decimal(0))
        total = known if isinstance(cost, _Ledger) else cost
        delivered = status is MessageStatus.DELIVERED
        amounts = _cost_fields(total, message.fallback_cost, delivered, count)
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
        "cost": amounts.cost,
        "priced": amounts.priced,
        "fallback_cost": amounts.fallback_cost,
    }
    rows = [{**row, "resolution": b.value, "bucket": truncate(at, b)} for b in Bucket]
    return Rollup(rows, message.category, channel, status.value)


def _counted_step(message: MessageRow) -> int:
    """The step a final message's rollup rows were written on: the one it was delivered on,
    else the one it ended on."""
    return message.current_step if message.delivered_step is None else message.delivered_step


def cost_correction(message: MessageRow, total: TotalCost) -> Rollup | None:
    """A final message's cost changed to `total` (a late receipt's price): its rollup rows
    take the difference, counting no message again. None when nothing changed."""
    if isinstance(total, _Ledger) or message.status not in FINAL_MESSAGE:
        return None
    if message.completed_at is None:
        return None
    delivered = message.status is MessageStatus.DELIVERED
    step = _counted_step(message)
    fallback = message.fallback_cost
    before = None if message.unpriced else (message.cost or Decimal(0))
    change = _cost_fields(total, fallback, delivered, 1).minus(
        _cost_fields(before, fallback, delivered, 1)
    )
    rollup = final_status_rollup(
        message, message.status, step, message.completed_at, count=0, amounts=change
    )
    return replace(rollup, counted=False)


def observe_outcome(
    message: MessageRow,
    attempt: AttemptRow,
    decision: Decision,
    *,
    source: str,
    at: datetime,
    cost: TotalCost = LEDGER,
) -> Rollup | None:
    """Metrics and log context for one signal the cascade just applied, and the rollup to
    write with it when it finalises the message (`cost`: its total after this change, if
    the change prices an attempt)."""
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
            cost=cost,
        )
        if message.status in FINAL_MESSAGE and message.completed_at is not None:
            # Revived (a late delivery of a failed message): it moves to its new status,
            # out of the one it was counted in, so each message counts once.
            before = final_status_rollup(
                message, message.status, _counted_step(message), message.completed_at, count=-1
            )
            rollup = replace(rollup, rows=rollup.rows + before.rows)
        return rollup
    return None


def _plus(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    return a if b is None else (a or Decimal(0)) + b


@dataclass
class _Totals:
    messages: int = 0
    delivered: int = 0
    later: int = 0
    latency_ms_sum: int = 0
    cost: Decimal | None = None
    saved: Decimal | None = None
    priced: int = 0

    def add(self, row: Any, delivered: bool) -> None:
        n = int(row.messages)
        self.messages += n
        if delivered:
            self.delivered += n
            self.later += n if row.step > 0 else 0
            self.latency_ms_sum += int(row.latency_ms_sum)
        self.priced += int(row.priced)
        self.cost = _plus(self.cost, row.cost)
        if delivered and row.cost is not None and row.fallback_cost is not None:
            self.saved = _plus(self.saved, row.fallback_cost - row.cost)

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

    @property
    def unpriced(self) -> int:
        return self.messages - self.priced


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


async def read_stats(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    start: datetime,
    end: datetime,
    bucket: Bucket,
    category: Category | None = None,
    currency: str | None = None,
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
            func.sum(r.priced).label("priced"),
            func.sum(r.fallback_cost).label("fallback_cost"),
        )
        .where(*conditions)
        .group_by(r.bucket, r.category, r.channel, r.status, r.step)
        .order_by(r.bucket, r.category, r.channel, r.status, r.step)
    )
    # Histograms are added up here: unnesting them in SQL costs more than the transfer.
    hist_rows = await conn.execute(
        select(r.category, r.channel, r.latency_hist).where(
            *conditions, r.status == MessageStatus.DELIVERED.value
        )
    )
    return _summarise(start, end, bucket, list(rows), list(hist_rows), currency)


def _summarise(
    start: datetime,
    end: datetime,
    bucket: Bucket,
    rows: list[Any],
    hist_rows: list[Any],
    currency: str | None = None,
) -> StatsView:
    overall = _Totals()
    per_category: dict[str, _Totals] = defaultdict(_Totals)
    per_channel: dict[tuple[str, str], _Totals] = defaultdict(_Totals)
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
        for totals in (
            overall,
            per_category[row.category],
            per_channel[(row.category, row.channel)],
        ):
            totals.add(row, delivered)
        if delivered:
            delivered_at[row.step] += n
    for hist_row in hist_rows:
        add_histograms(per_category[hist_row.category].hist, hist_row.latency_hist)
        add_histograms(
            per_channel[(hist_row.category, hist_row.channel)].hist, hist_row.latency_hist
        )
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
                saved=t.saved,
                unpriced=t.unpriced,
            )
            for name, t in sorted(per_category.items())
        ],
        by_channel=[
            ChannelView(
                category=Category(name),
                channel=channel,
                messages=t.messages,
                delivered=t.delivered,
                delivery_rate=_ratio(t.delivered, t.messages),
                median_ms=percentile(t.hist, 0.5),
                fell_over=t.failover_rate(),
                cost=t.cost,
                cost_per_delivered=t.cost / t.delivered
                if t.cost is not None and t.delivered
                else None,
                saved=t.saved,
                unpriced=t.unpriced,
            )
            for (name, channel), t in sorted(per_channel.items())
            if t.messages
        ],
        currency=currency,
        cost=overall.cost,
        saved=overall.saved,
        unpriced=overall.unpriced,
    )
