"""Small helpers the integration tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

FINAL = {"delivered", "failed", "expired", "cancelled", "suppressed"}


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
