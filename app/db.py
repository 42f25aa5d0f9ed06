"""The engine and the one way to get a transaction.

The boundary (an endpoint dependency or a job wrapper) opens the transaction; services
take the `Transaction` as their first argument and never commit. Jobs requested inside
the transaction are enqueued only after it commits and dropped if it rolls back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.queue import Job, JobQueue
from app.webhooks.presence import EndpointPresence

if TYPE_CHECKING:
    from app.ledger.repository import Change

log = structlog.get_logger()


def async_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and select the asyncpg driver."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


# A connection back in the pool for less than this is not pinged before reuse.
PING_AFTER_IDLE_SECONDS = 1.0


def create_engine(url: str, pool_size: int) -> AsyncEngine:
    engine = create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=10,
        connect_args={"command_timeout": 30, "timeout": 10},
        json_serializer=lambda value: orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode(),
        json_deserializer=orjson.loads,
    )
    _ping_idle_connections(engine)
    _discard_confused_connections(engine)
    return engine


def _discard_confused_connections(engine: AsyncEngine) -> None:
    """A session Postgres terminates mid-transaction (a restart, an admin's kill) sometimes
    surfaces as asyncpg's `InternalClientError` ("cannot switch to state …") instead of
    "connection is closed", and SQLAlchemy then returns that connection to the pool, where
    every later checkout fails the same way (sqlalchemy#13241, unfixed in 2.1.9). Treat
    it as the disconnect it is: the connection is invalidated, never reused."""

    def mark_disconnect(context: ExceptionContext) -> None:
        # The dialect's own DBAPI error, raised from asyncpg's.
        error = context.original_exception
        if isinstance(error, asyncpg.InternalClientError) or isinstance(
            error.__cause__, asyncpg.InternalClientError
        ):
            context.is_disconnect = True

    event.listen(engine.sync_engine, "handle_error", mark_disconnect)


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """`pool_pre_ping`, but only for connections idle a while: under load a ping per
    checkout was a round trip per request; after a Postgres restart the idle pool is
    still checked before use (a dead connection is replaced, not handed out)."""
    pool = engine.sync_engine.pool

    def stamp(dbapi_connection: Any, record: Any, *_: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    def ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("returned_at", 0.0) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # any failure: the pool reconnects and retries the checkout
            raise DisconnectionError(str(exc)) from exc

    event.listen(pool, "connect", stamp)
    event.listen(pool, "checkin", stamp)
    event.listen(pool, "checkout", ping_if_idle)


@dataclass
class Transaction:
    conn: AsyncConnection
    jobs: list[Job] = field(default_factory=list)
    # Categories whose delivery engines to wake after commit (new work is due now).
    wakes: set[str] = field(default_factory=set)
    # Run after commit (metrics that must count only what was committed).
    committed: list[Callable[[], None]] = field(default_factory=list)
    # Inside a delivery-engine batch: the messages' changes, written together (see
    # `app.cascade.service.write`); None writes each change at once.
    changes: list[Change] | None = None
    # The process's webhook-endpoint cache (its Runtime's); None asks the database.
    endpoint_presence: EndpointPresence | None = None

    def enqueue_after_commit(self, job: Job) -> None:
        self.jobs.append(job)

    def wake_after_commit(self, category: str) -> None:
        self.wakes.add(category)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)

    async def finish(self, queue: JobQueue) -> None:
        """What waited for the commit: the jobs and wake-ups (one Redis call), callbacks."""
        for callback in self.committed:
            callback()
        await queue.enqueue_all(self.jobs, wake=sorted(self.wakes))


async def finish_committed(tx: Transaction, queue: JobQueue) -> None:
    """`tx.finish` for a group commit's transaction: whatever goes wrong after the commit
    (Redis away, …), its rows are committed and the engines' poll finds them, so every
    request of the group still gets its answer."""
    try:
        await tx.finish(queue)
    except Exception as exc:
        log.warning("after_commit_failed", error=repr(exc))


@asynccontextmanager
async def transaction(
    engine: AsyncEngine,
    queue: JobQueue,
    *,
    single_write: bool = False,
    endpoint_presence: EndpointPresence | None = None,
) -> AsyncIterator[Transaction]:
    """`single_write`: the work writes with one statement (reads before it are fine), so
    it runs without BEGIN/COMMIT: that statement commits on its own, before the jobs are
    enqueued, as a transaction's would. Two round trips fewer per accepted message."""
    if single_write:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            tx = Transaction(conn, endpoint_presence=endpoint_presence)
            yield tx
    else:
        async with engine.begin() as conn:
            tx = Transaction(conn, endpoint_presence=endpoint_presence)
            yield tx
    await tx.finish(queue)
