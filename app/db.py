"""The engine and the one way to get a transaction.

The boundary (an endpoint dependency or a job wrapper) opens the transaction; services
take the `Transaction` as their first argument and never commit. Jobs requested inside
the transaction are enqueued only after it commits and dropped if it rolls back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.queue import Job, JobQueue


def async_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and select the asyncpg driver."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def create_engine(url: str, pool_size: int) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={"command_timeout": 30, "timeout": 10},
    )


@dataclass
class Transaction:
    conn: AsyncConnection
    jobs: list[Job] = field(default_factory=list)

    def enqueue_after_commit(self, job: Job) -> None:
        self.jobs.append(job)


@asynccontextmanager
async def transaction(engine: AsyncEngine, queue: JobQueue) -> AsyncIterator[Transaction]:
    async with engine.begin() as conn:
        tx = Transaction(conn)
        yield tx
    await queue.enqueue_all(tx.jobs)
