"""Abuse limits: a per-key request rate (429 + Retry-After), the body size (413) on every
operation that takes a body, and the batch size."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from app.auth.ratelimit import RequestRateLimit
from app.main import create_app
from tests.conftest import Service, Tenant
from tests.security.spec_walk import operations

RATE, BURST = 1.0, 3


@pytest.fixture
async def strict_api(service: Service) -> AsyncIterator[str]:
    """A second API process on the same database and Redis, with a tight per-key rate."""
    settings = service.settings.model_copy(update={"api_rate_per_second": RATE, "api_burst": BURST})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


def _client(base_url: str, tenant: Tenant) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {tenant.key}"})


async def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not(
    strict_api: str, tenant: Tenant, other_tenant: Tenant
) -> None:
    async with _client(strict_api, tenant) as client, _client(strict_api, other_tenant) as other:
        answers = [await client.get("/v1/messages") for _ in range(BURST + 5)]
        neighbour = await other.get("/v1/messages")
        limited = next(a for a in answers if a.status_code == 429)
        await asyncio.sleep(int(limited.headers["retry-after"]))
        after_waiting = await client.get("/v1/messages")

    statuses = [a.status_code for a in answers]
    assert statuses[:BURST] == [200] * BURST
    assert statuses.count(429) >= 4
    assert limited.headers["content-type"] == "application/problem+json"
    assert limited.json()["type"].endswith("/too-many-requests")
    assert 1 <= int(limited.headers["retry-after"]) <= 1 / RATE
    assert neighbour.status_code == 200  # the limit is per key
    assert after_waiting.status_code == 200


async def test_every_operation_that_takes_a_body_refuses_one_too_large(
    service: Service, tenant: Tenant
) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        spec: dict[str, Any] = (await client.get("/openapi.json")).json()
    settings = service.settings
    answers = {}
    for op in operations(spec):
        if not op.has_body:
            continue
        limit = (
            settings.max_batch_body_bytes if op.path.endswith("/batch") else settings.max_body_bytes
        )
        path = op.path
        for name in op.path_params:
            path = path.replace("{" + name + "}", "x")
        body = b'{"pad": "' + b"x" * limit + b'"}'
        response = await tenant.client.request(
            op.method, path, content=body, headers={"content-type": "application/json"}
        )
        answers[op.name] = (response.status_code, response.headers.get("content-type"))

    assert set(answers.values()) == {(413, "application/problem+json")}, answers


async def test_a_batch_over_the_item_limit_is_refused(service: Service, tenant: Tenant) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        spec = (await client.get("/openapi.json")).json()
    if "/v1/messages/batch" not in spec["paths"]:
        pytest.skip("no batch endpoint yet")
    items = spec["components"]["schemas"]["SendBatchRequest"]["properties"]["messages"]["maxItems"]
    items += 1
    body = {
        "category": "transactional",
        "content": {"text": "hi"},
        "cascade": [{"channel": "sms"}],
        "messages": [{"to": {"phone": "+48600100200"}}] * items,
    }

    response = await tenant.client.post("/v1/messages/batch", json=body)

    assert response.status_code in (413, 422), response.text
    assert response.headers["content-type"] == "application/problem+json"
    listed = (await tenant.client.get("/v1/messages")).json()
    assert listed["data"] == []  # nothing of the refused batch was accepted


async def test_concurrent_requests_of_one_key_share_the_burst_across_processes(
    service: Service,
) -> None:
    """Two processes' limiters (each leasing slots for the requests waiting together) on
    one Redis: however many requests of a key arrive at once, no more than the burst go
    ahead, and every one refused is told to wait."""
    burst = 10
    redis = service.api_runtime.redis
    limits = [RequestRateLimit(redis, 0.5, burst) for _ in range(2)]
    key = uuid.uuid4()

    waits = await asyncio.gather(*(limits[i % 2].retry_after(key) for i in range(40)))
    again = await asyncio.gather(*(limits[i % 2].retry_after(key) for i in range(10)))

    assert sum(w == 0 for w in waits) == burst
    assert all(w > 0 for w in waits if w != 0)
    assert all(w > 0 for w in again)  # a slot frees every 2 s: none yet
