"""A worker that stops while a claim is under way: sends already with the provider are
recorded, the rest are handed back for the next worker, never left `sending`."""

from __future__ import annotations

import asyncio

import pytest

from app.cascade import engine as engine_module
from app.cascade.engine import DeliveryEngine
from providers.base import Category, Channel
from providers.sandbox import SandboxProvider
from tests.conftest import Service, Tenant
from tests.helpers import accept_without_wake, message_body, wait_until_final


async def test_a_send_claimed_by_a_stopping_worker_is_handed_back_and_sent_once_later(
    service: Service, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "STOP_SEND_GRACE_SECONDS", 0.0)
    body = message_body(
        to={"phone": "+48600100200", "email": "ann@example.com"},
        cascade=[{"channel": "sms", "timeout": 120}, {"channel": "email"}],
    )
    message_id = await accept_without_wake(service.worker_runtime, tenant.id, body)
    stopping = DeliveryEngine(service.worker_runtime, "transactional")
    stop = asyncio.Event()
    stop.set()
    await stopping.run(stop)  # stopped, its grace over: the claim below was under way
    await stopping.claim(100)
    await stopping.drain()

    message = await wait_until_final(tenant.client, message_id)

    (sms,) = message["attempts"]
    assert (sms["status"], sms["tries"]) == ("delivered", 2)  # claimed twice, sent once
    sandbox = service.worker_runtime.providers.get(Channel.SMS, "sandbox", Category.TRANSACTIONAL)
    assert isinstance(sandbox, SandboxProvider)
    assert sandbox.submissions[sms["id"]] == 1
    assert message["status"] == "delivered"
