"""Closing the sandbox (a worker stopping) posts the receipts it still owes before its
client closes, and gives up on a receiver that never answers within a bound: no post
left to run against a closed client."""

from __future__ import annotations

import asyncio

import httpx2
import orjson
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from providers import sandbox
from providers.base import Category, Channel, Content, OutboundMessage
from providers.sandbox import SandboxConfig, SandboxProvider


def _provider(handler: httpx2.MockTransport, delay: float) -> SandboxProvider:
    config = SandboxConfig(
        callback_url="http://cascade.test/v1/providers/sandbox/status",
        secret=SecretStr("sandbox-secret"),
        delay_seconds=delay,
    )
    return SandboxProvider(Channel.SMS, config, http=httpx2.AsyncClient(transport=handler))


def _sms(i: int) -> OutboundMessage:
    return OutboundMessage(
        message_id=f"msg_{i}",
        attempt_id=f"att_{i}",
        category=Category.TRANSACTIONAL,
        channel=Channel.SMS,
        address=f"+4860010{i:03d}0",  # delivered, after the sandbox's delay
        content=Content(text="Your code is 4711"),
        timeout_seconds=120,
    )


def _attempts(request: httpx2.Request) -> list[str]:
    data = orjson.loads(request.content)
    return [report["attempt_id"] for report in data.get("receipts", [data])]


def _sandbox_tasks() -> list[asyncio.Task[object]]:
    names = ("_send_receipt", "_post_outbox")
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__name__", "") in names and not task.done()
    ]


async def test_closing_posts_the_receipts_still_in_their_delay_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandbox, "CLOSE_PATIENCE_SECONDS", 0.2)
    posted: list[str] = []

    def receiver(request: httpx2.Request) -> httpx2.Response:
        posted.extend(_attempts(request))
        return httpx2.Response(200)

    provider = _provider(httpx2.MockTransport(receiver), delay=600)
    for i in range(120):
        await provider.send(_sms(i))

    with capture_logs() as logs:
        await provider.aclose()

    assert sorted(posted) == sorted(f"att_{i}" for i in range(120))
    assert _sandbox_tasks() == []
    assert [e for e in logs if e["event"] == "sandbox_receipts_dropped"] == []


async def test_closing_gives_up_on_a_receiver_that_never_takes_them_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandbox, "CLOSE_PATIENCE_SECONDS", 0.2)
    tries = 0

    def down(request: httpx2.Request) -> httpx2.Response:
        nonlocal tries
        tries += 1
        return httpx2.Response(503)

    provider = _provider(httpx2.MockTransport(down), delay=0)
    for i in range(3):
        await provider.send(_sms(i))

    with capture_logs() as logs:
        await provider.aclose()

    assert tries >= 1
    assert _sandbox_tasks() == []
    assert [e["receipts"] for e in logs if e["event"] == "sandbox_receipts_dropped"] == [3]
