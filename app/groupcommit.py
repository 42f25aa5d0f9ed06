"""Group commit: requests that arrive together are written together, one flush each.

Callers `submit` an item and wait for its own result. A writer flushes what has gathered
in one call of `flush` (one transaction): at once when no flush is running (a lone request
never waits for company); otherwise the items gather while the running flush writes, and
the next flush takes them when it ends, or sooner, alongside it, once `max_items` have
gathered or the oldest has waited `max_wait` (up to `max_flushes` at a time). Each item
gets the result `flush` gave it: a value, or an exception of its own (a conflict that
must not fail its neighbours); an exception out of `flush` itself fails every item of
that flush, and nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeAlias, TypeVar

import structlog

from app.errors import Unavailable, is_database_error

log = structlog.get_logger()

T = TypeVar("T")
R = TypeVar("R")

# What `flush` returns per item, in the order given: its value or its own error.
Outcome: TypeAlias = R | BaseException
Flush: TypeAlias = Callable[[list[T]], Awaitable[Sequence[Outcome[R]]]]


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Flush[T, R],
        *,
        max_items: int = 256,
        max_wait: float = 0.002,
        max_flushes: int = 4,
        name: str = "group_commit",
    ) -> None:
        self._flush = flush
        self.max_items = max(1, max_items)
        self.max_wait = max_wait
        self.max_flushes = max(1, max_flushes)
        self.name = name
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """Queue `item` for the next flush and wait for its result (after the commit)."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._running or len(self._pending) >= self.max_items:
            self._start_flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait, self._on_timer)
        # A caller that gives up (client gone) cancels only its wait: the flush it joined
        # still writes its item (and finds its future done).
        return await future

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending:
            self._start_flush()

    def _start_flush(self) -> None:
        if len(self._running) >= self.max_flushes:
            return  # the next flush to finish takes them
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.create_task(self._run())
        self._running.add(task)

    async def _run(self) -> None:
        task = asyncio.current_task()
        try:
            # Started in a request's turn of the loop: the task runs on the next one, so
            # requests parsed in the same turn join this flush.
            batch = self._pending[: self.max_items]
            del self._pending[: len(batch)]
            if batch:
                await self._write(batch)
        finally:
            if task is not None:
                self._running.discard(task)
            if self._pending and not self._closed:
                self._start_flush()

    async def _write(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._flush([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{self.name}: {len(outcomes)} results for {len(batch)} items")
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def close(self) -> None:
        """Flush what is queued and wait for the flushes running; refuse new items."""
        self._closed = True
        while self._pending or self._running:
            if self._pending and len(self._running) < self.max_flushes:
                self._start_flush()
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)


async def submit_or_unavailable(
    group: GroupCommit[T, R], item: T, *, event: str, nothing_of: str
) -> R:
    """`group.submit(item)`, where a flush the database failed as a whole (rolled back:
    nothing of it stored) is the same clear 503 for each of its requests; any other
    failure of a whole flush is a bug (a 500, logged)."""
    try:
        return await group.submit(item)
    except FlushFailed as exc:
        if not is_database_error(exc.__cause__):
            raise
        log.warning(event, error=repr(exc.__cause__))
        raise Unavailable(
            detail=f"database unreachable (nothing of this {nothing_of} was stored; retry)"
        ) from exc


async def alone_if_it_fails(
    write: Callable[[list[T]], Awaitable[Sequence[R]]],
    items: list[T],
    *,
    fatal: Callable[[BaseException], bool],
    event: str,
) -> Sequence[Outcome[R]]:
    """Write a flush whole; should that fail for a reason `fatal` does not name (the
    database being away fails every item alike), write each item alone, so that one bad
    item (a deadlock, a row the database refuses) fails only itself."""
    try:
        return await write(items)
    except Exception as exc:
        if len(items) == 1 or fatal(exc):
            raise
        log.warning(event, items=len(items), error=repr(exc))
    outcomes: list[Outcome[R]] = []
    for item in items:
        try:
            outcomes.extend(await write([item]))
        except Exception as alone:
            outcomes.append(alone)
    return outcomes


class FlushFailed(Exception):
    """The flush an item was in failed as a whole (its cause is the flush's error)."""


def _copy(exc: BaseException) -> BaseException:
    # Each waiter raises its own exception object (one raised in many tasks would collect
    # every task's traceback); the flush's error stays reachable as the cause.
    copy = FlushFailed(str(exc) or type(exc).__name__)
    copy.__cause__ = exc
    return copy
