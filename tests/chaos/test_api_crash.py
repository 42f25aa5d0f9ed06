"""The API dies after committing a message and before waking the delivery engine: the
engine's own look at the ledger delivers it (the client never got its 202; the ledger has
the message all the same)."""

from __future__ import annotations

import asyncio
import random
import signal

import httpx
import pytest
from sqlalchemy import text

from tests.chaos.report import FaultRow
from tests.chaos.stack import ChaosStack, StreamResult, sms_body

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


@pytest.mark.timeout(150)
async def test_api_killed_mid_flush_every_202_is_in_the_ledger_with_its_event(
    stack: ChaosStack, report_fault: list[FaultRow]
) -> None:
    """Many requests in flight share flushes; SIGKILL lands in the middle of one (or of
    the wake-up after it). Every 202 a client ever got names a message in the ledger, and
    no message is there without its `accepted` event (nor the other way round)."""
    rng = random.Random(4711)
    tenant = await stack.new_tenant()
    stream = StreamResult()

    async def kill_soon() -> None:
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        stack.api.send(signal.SIGKILL)

    for _ in range(KILLS):
        bodies = [sms_body("+48600100200") for _ in range(400)]
        sent, _ = await asyncio.gather(
            tenant.send_stream(bodies, concurrency=32, request_timeout=5), kill_soon()
        )
        stream.extend(sent)
        await stack.api.wait(within=10)
        await stack.start_api()

    stored = set(await stack.message_ids(tenant.id))
    lost = set(stream.accepted) - stored
    async with stack.engine.connect() as conn:
        unpaired = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM messages m WHERE m.tenant_id = :tenant AND NOT EXISTS"
                    " (SELECT 1 FROM events e WHERE e.message_id = m.id AND e.seq = 1"
                    " AND e.status = 'accepted')"
                ),
                {"tenant": tenant.id},
            )
        ).scalar_one()
    report_fault.append(
        FaultRow(
            "API SIGKILL mid-flush (32 in flight)",
            KILLS,
            len(stream.accepted),
            len(lost),
            0,
            stream.server_errors,
            f"answers {dict(stream.statuses)}, {stream.no_answer} cut off or refused;"
            f" {len(stored) - len(stream.accepted)} committed but never answered",
        )
    )
    assert stream.accepted, "no request was accepted before the kills"
    assert stream.no_answer > 0, "no kill landed while requests were in flight"
    assert lost == set()
    assert unpaired == 0
    assert stream.server_errors == 0
