"""The API process's receipt writer: provider status callbacks share one transaction.

Each callback is verified and parsed in its request (`endpoints.provider_status`), then
its reports join the writer's next flush (`app/groupcommit.py`): one transaction finds and
locks every attempt's message in one query and applies all the reports
(`service.record_statuses`), commits, wakes the engines for the failovers it started,
and only then answers each callback 200: what a provider is told was received is
committed, so its retry (after a 503) is the only redelivery, and that is deduplicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cascade.service import PriceBook, record_statuses
from app.db import Transaction, finish_committed
from app.errors import is_lock_conflict, is_unavailable
from app.groupcommit import GroupCommit, Outcome, alone_if_it_fails, submit_or_unavailable
from app.ops.stats.service import SHARDS
from app.queue import JobQueue
from app.runtime import utcnow
from app.webhooks.presence import EndpointPresence
from providers.base import StatusUpdate

log = structlog.get_logger()

# A flush that deadlocks with another writer (or fails to serialise) runs again whole,
# this many times in all, before its callbacks are tried one by one.
CONFLICT_TRIES = 3

# One callback: its provider and its reports (most carry one, some a batch).
Callback = tuple[str, Sequence[StatusUpdate]]


class StatusWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        queue: JobQueue,
        endpoint_presence: EndpointPresence | None = None,
        *,
        max_items: int = 256,
        max_wait: float = 0.002,
        max_flushes: int = 4,
        prices: PriceBook | None = None,
    ) -> None:
        self._engine = engine
        self._endpoint_presence = endpoint_presence
        self._prices = prices
        self._queue = queue
        # Each flush writes its stats rows on a shard no other flush of this process holds.
        self._free_shards = list(range(SHARDS))
        self.group: GroupCommit[Callback, int] = GroupCommit(
            self._flush,
            max_items=max_items,
            max_wait=max_wait,
            max_flushes=max_flushes,
            name="status_writer",
        )

    async def record(self, provider_name: str, updates: Sequence[StatusUpdate]) -> int:
        """Apply one callback's reports with the others of its flush; how many changed
        something, once committed."""
        if not updates:
            return 0
        return await submit_or_unavailable(
            self.group, (provider_name, updates), event="status_flush_failed", nothing_of="callback"
        )

    async def close(self) -> None:
        await self.group.close()

    async def _flush(self, callbacks: list[Callback]) -> Sequence[Outcome[int]]:
        for _ in range(CONFLICT_TRIES - 1):
            try:
                return await self._write(callbacks)
            except Exception as exc:
                if not is_lock_conflict(exc):
                    break
                log.warning("status_flush_conflict_retrying", items=len(callbacks))
        # A deadlock with the engine, one bad report: the others must not pay for it.
        return await alone_if_it_fails(
            self._write, callbacks, fatal=is_unavailable, event="status_flush_failed_retrying_alone"
        )

    async def _write(self, callbacks: list[Callback]) -> list[int]:
        reports = [(provider, update) for provider, updates in callbacks for update in updates]
        shard = self._free_shards.pop() if self._free_shards else None
        try:
            async with self._engine.begin() as conn:
                tx = Transaction(conn, endpoint_presence=self._endpoint_presence)
                applied = await record_statuses(tx, reports, utcnow(), shard, self._prices)
        finally:
            if shard is not None:
                self._free_shards.append(shard)
        await finish_committed(tx, self._queue)
        counts = []
        start = 0
        for _, updates in callbacks:
            counts.append(sum(applied[start : start + len(updates)]))
            start += len(updates)
        return counts
