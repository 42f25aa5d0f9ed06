"""The API process's accept writer: concurrent `POST /v1/messages` share one transaction.

Each request validates and prepares its row in its own task, then joins the writer's
next flush (`app/groupcommit.py`). A flush claims the idempotency keys and inserts the
messages with their `accepted` events in one statement of arrays
(`service.accept_pending`), commits, wakes the delivery engines of every category it
touched in one Redis call, and only then answers each request: 202 still means committed.
A key used twice in one flush, or already in the ledger, is resolved per request (a replay
or a 409), never failing the others; a database error fails the whole flush (a 503 for
each), and the flush's single transaction leaves nothing of it behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import Transaction, finish_committed
from app.errors import ProblemError, is_unavailable
from app.groupcommit import GroupCommit, Outcome, alone_if_it_fails, submit_or_unavailable
from app.messages.schemas import SendMessageRequest
from app.messages.service import (
    Acceptance,
    PendingMessage,
    accept_pending,
    inline_content,
    message_row,
    pending_message,
    resolve_content,
)
from app.queue import JobQueue
from app.settings import Settings
from app.templates.service import TemplateLookup
from app.webhooks.presence import EndpointPresence
from providers.registry import ProviderRegistry

log = structlog.get_logger()


class AcceptWriter:
    """One per API process: the group-commit writer of new messages."""

    def __init__(
        self,
        engine: AsyncEngine,
        queue: JobQueue,
        endpoint_presence: EndpointPresence | None = None,
        *,
        max_items: int = 256,
        max_wait: float = 0.002,
        max_flushes: int = 4,
    ) -> None:
        self._engine = engine
        self._endpoint_presence = endpoint_presence
        self._queue = queue
        self.group: GroupCommit[PendingMessage, Acceptance] = GroupCommit(
            self._flush,
            max_items=max_items,
            max_wait=max_wait,
            max_flushes=max_flushes,
            name="accept_writer",
        )

    async def accept(
        self,
        tenant_id: uuid.UUID,
        request: SendMessageRequest,
        idempotency_key: str | None,
        registry: ProviderRegistry,
        settings: Settings,
        at: datetime,
    ) -> Acceptance:
        """Prepare the message (InvalidRequest when it cannot be sent as given), then wait
        for the flush that commits it; a conflict is raised as its ProblemError."""
        if request.content.template is None:
            content = inline_content(request)
        else:
            async with self._engine.connect() as conn:
                content = await resolve_content(request, TemplateLookup(conn, tenant_id, settings))
        row = message_row(tenant_id, request, registry, settings, content, at)
        return await submit_or_unavailable(
            self.group,
            pending_message(row, request, idempotency_key),
            event="accept_flush_failed",
            nothing_of="request",
        )

    async def close(self) -> None:
        await self.group.close()

    async def _flush(self, items: list[PendingMessage]) -> Sequence[Outcome[Acceptance]]:
        # Not the database being away: one bad row must not fail its neighbours.
        return await alone_if_it_fails(
            self._write, items, fatal=is_unavailable, event="accept_flush_failed_retrying_alone"
        )

    async def _write(self, items: list[PendingMessage]) -> list[Acceptance | ProblemError]:
        # The flush writes with one statement (keys, messages, events), atomic on its own:
        # no BEGIN/COMMIT round trips around it (what follows it only reads).
        async with self._engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            tx = Transaction(conn, endpoint_presence=self._endpoint_presence)
            outcomes = await accept_pending(tx, items)
        await finish_committed(tx, self._queue)
        return outcomes
