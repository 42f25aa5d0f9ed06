"""Webhook test fixtures: a receiving server, and the webhook jobs run on an injected clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from app.runtime import utcnow
from app.webhooks import jobs
from tests.conftest import Service
from tests.webhooks.receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as started:
        yield started


class WebhookJobs:
    """Runs the webhook jobs in the test, as of `at` (time injected, never slept)."""

    def __init__(self, service: Service) -> None:
        self.at: datetime | None = None
        self.ctx: dict[str, Any] = {"runtime": service.worker_runtime, "clock": self.now}

    def now(self) -> datetime:
        return self.at or utcnow()

    async def deliver(self, delivery_id: str, attempt: int, at: datetime) -> None:
        self.at = at
        await jobs.deliver_webhook(self.ctx, delivery_id, attempt)


@pytest.fixture
async def webhook_jobs(service: Service) -> AsyncIterator[WebhookJobs]:
    yield WebhookJobs(service)


async def create_endpoint(client: httpx.AsyncClient, url: str, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/webhooks", json={"url": url, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def deliveries(
    client: httpx.AsyncClient, endpoint_id: str, **params: Any
) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/webhooks/{endpoint_id}/deliveries", params=params)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data
