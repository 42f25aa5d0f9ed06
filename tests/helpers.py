"""Small helpers the integration tests share."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import httpx
from sqlalchemy import select, update

from app.cascade.machine import FINAL_MESSAGE
from app.ids import IdPrefix, from_public
from app.ledger.tables import messages
from app.messages.schemas import SendMessageRequest
from app.messages.service import accept_message
from app.runtime import Runtime, utcnow

T = TypeVar("T")

FINAL = frozenset(status.value for status in FINAL_MESSAGE)


def message_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "category": "transactional",
        "to": {"push_token": "device-ok", "phone": "+48600100200", "email": "ann@example.com"},
        "content": {"text": "Your code is 4711", "subject": "Login code"},
        "cascade": [{"channel": "push"}, {"channel": "sms"}, {"channel": "email"}],
    }
    body.update(overrides)
    return body


async def send(client: httpx.AsyncClient, body: dict[str, Any], **kwargs: Any) -> str:
    response = await client.post("/v1/messages", json=body, **kwargs)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def wait_until_final(
    client: httpx.AsyncClient, message_id: str, within: float = 30.0
) -> dict[str, Any]:
    """Poll the public API until the message reaches a final status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        response = await client.get(f"/v1/messages/{message_id}")
        assert response.status_code == 200, response.text
        message: dict[str, Any] = response.json()
        if message["status"] in FINAL:
            return message
        if loop.time() > deadline:
            raise AssertionError(f"message still {message['status']}: {message}")
        await asyncio.sleep(0.05)


def attempt_statuses(message: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["channel"], a["status"]) for a in message["attempts"]]


async def eventually(probe: Callable[[], T | None], within: float = 10.0) -> T:
    """Poll `probe` until it returns something truthy (state the test cannot await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (value := probe()):
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
    return value


async def accept_without_wake(
    runtime: Runtime, tenant_id: uuid.UUID, body: dict[str, Any], *, timed: bool = True
) -> str:
    """Commit a message the way the API does, but lose its wake-up (a crash before it, a
    Redis that is down): only the engine's own look at the ledger finds it. `timed=False`
    also takes it out of the engine's sight (no `due_at`), so the test drives its steps."""
    async with runtime.transaction() as tx:
        acceptance = await accept_message(
            tx,
            tenant_id,
            SendMessageRequest.model_validate(body),
            None,
            runtime.providers,
            runtime.settings,
            utcnow(),
        )
        tx.wakes.clear()
        if not timed:
            await tx.conn.execute(
                update(messages)
                .where(messages.c.id == from_public(IdPrefix.MESSAGE, acceptance.message.id))
                .values(due_at=None)
            )
    return acceptance.message.id


async def due_at(runtime: Runtime, message_id: str) -> datetime | None:
    """When the delivery engine will look at the message next (None: never again)."""
    async with runtime.engine.connect() as conn:
        value: datetime | None = (
            await conn.execute(
                select(messages.c.due_at).where(
                    messages.c.id == from_public(IdPrefix.MESSAGE, message_id)
                )
            )
        ).scalar_one()
    return value
