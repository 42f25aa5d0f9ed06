"""The API dies after committing a message and before waking the delivery engine: the
engine's own look at the ledger delivers it (the client never got its 202; the ledger has
the message all the same)."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.chaos.report import FaultRow
from tests.chaos.stack import ChaosStack, sms_body

KILLS = 3


@pytest.mark.timeout(150)
async def test_api_killed_between_commit_and_wake_up_the_engine_delivers(
    stack: ChaosStack, report_fault: list[FaultRow]
) -> None:
    tenant = await stack.new_tenant()
    refused = 0
    seen: set[str] = set()
    for _ in range(KILLS):
        stack.trap.on_enqueue = lambda: stack.api.send(signal.SIGKILL)
        async with tenant.client() as client:
            try:
                await client.post("/v1/messages", json=sms_body("+48600100200"))
            except httpx.HTTPError:
                refused += 1
        await stack.api.wait(within=10)
        # Only the message this kill left behind: the engine may already have delivered
        # the ones before it.
        new = [m for m in await stack.message_ids(tenant.id) if m not in seen]
        seen.update(new)
        assert len(new) == 1
        await stack.start_api()

    committed = await stack.message_statuses(tenant.id)
    final = await stack.wait_until_final(tenant.id, within=60)
    duplicates = await stack.duplicate_submits(final)
    report_fault.append(
        FaultRow(
            "API SIGKILL between commit and wake-up",
            KILLS,
            len(committed),
            KILLS - sum(status == "delivered" for status in final.values()),
            duplicates,
            0,
            "delivered by the engine's poll; no client saw a 202",
        )
    )
    assert refused == KILLS
    assert len(committed) == KILLS
    assert set(final.values()) == {"delivered"}
    assert duplicates == 0
