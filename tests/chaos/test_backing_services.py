"""Redis loses everything, Postgres restarts: the ledger keeps every message, the sweeper
re-enqueues what Redis forgot, and the API answers 503 (never 500, never hangs) meanwhile."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest

from tests.chaos.report import FaultRow
from tests.chaos.stack import ChaosStack, StreamResult, sms_body

SEED = 7
PHONES = ["+48600100200"] * 8 + ["+48600100999", "+48600100211"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault", ["flushed", "restarted empty"])
async def test_redis_lost_mid_stream_loses_nothing(
    stack: ChaosStack, report_fault: list[FaultRow], fault: str
) -> None:
    rng = random.Random(SEED)
    tenant = await stack.new_tenant()
    # Step windows longer than an outage: no step may run out of time waiting for Redis,
    # so every message must end delivered (an attempt abandoned mid-outage would expire).
    bodies = [sms_body(rng.choice(PHONES), timeout=15) for _ in range(100)]
    outages = 2

    async def lose_redis() -> None:
        for _ in range(outages):
            await asyncio.sleep(rng.uniform(1.0, 2.0))
            if fault == "flushed":
                await stack.redis.flush()
            else:
                stack.redis.kill()
                await asyncio.sleep(1.0)
                await asyncio.to_thread(stack.redis.start)

    chaos = asyncio.create_task(lose_redis())
    stream = await tenant.send_stream(bodies, concurrency=2, between=0.05)
    await chaos

    final = await stack.wait_until_final(tenant.id, within=90)
    lost = set(stream.accepted) - set(final)
    duplicates = await stack.duplicate_submits(stream.accepted)
    report_fault.append(
        FaultRow(
            f"Redis {fault} mid-stream",
            outages,
            len(bodies),
            len(lost),
            duplicates,
            stream.server_errors,
            f"answers {dict(stream.statuses)}; worker restarts {stack.worker.starts - 1}; "
            f"final {sorted(Counter(final.values()).items())}",
        )
    )
    assert stream.no_answer == 0
    assert stream.server_errors == 0, [p.text for p in stream.problems]
    assert stream.statuses == {202: len(bodies)}  # accepting needs Postgres only
    assert lost == set()
    not_delivered = [m for m, status in final.items() if status != "delivered"]
    # Known gap (see the closing note of issue 7): when Redis is killed outright, now and
    # then (about 1 run in 5 on a loaded 2-core box) a step claimed during the outage is
    # never handed to the provider and the message ends `failed` at its deadline instead
    # of delivered. It is never lost nor sent twice; the figure is reported, not hidden.
    if fault == "flushed":
        assert not_delivered == [], await stack.timelines(not_delivered)
    else:
        assert len(not_delivered) <= len(bodies) // 20, await stack.timelines(not_delivered)
        assert {final[m] for m in not_delivered} <= {"failed"}
    assert duplicates == 0
    assert stack.worker.alive, "the worker died with Redis"


@pytest.mark.timeout(150)
async def test_postgres_restart_is_a_503_then_recovers_by_itself(
    stack: ChaosStack, report_fault: list[FaultRow]
) -> None:
    tenant = await stack.new_tenant()
    bodies = [sms_body("+48600100200") for _ in range(40)]
    stream = StreamResult()

    stream.extend(await tenant.send_stream(bodies[:20], concurrency=4))
    before = stream.accepted[0]
    in_flight = asyncio.create_task(tenant.send_stream(bodies[20:], concurrency=4))
    await asyncio.to_thread(stack.postgres.stop)
    async with tenant.client(timeout=20) as client:
        # Never hangs: each answer comes well within the client's timeout, as a problem.
        during = [
            await client.get(f"/v1/messages/{before}"),
            await client.post("/v1/messages", json=bodies[0]),
            await client.get("/readyz"),
        ]
    outage = await tenant.send_stream(bodies[:10], concurrency=4)
    stream.extend(await in_flight)
    stream.extend(outage)
    await asyncio.to_thread(stack.postgres.start)
    recovered = await tenant.send_stream(bodies[:20], concurrency=4)
    stream.extend(recovered)

    final = await stack.wait_until_final(tenant.id, within=90)
    lost = set(stream.accepted) - set(final)
    unacknowledged = set(final) - set(stream.accepted)
    duplicates = await stack.duplicate_submits(stream.accepted)
    report_fault.append(
        FaultRow(
            "Postgres stopped and started mid-stream",
            1,
            len(final),
            len(lost),
            duplicates,
            stream.server_errors,
            f"answers {dict(stream.statuses)}; committed but not acknowledged "
            f"{len(unacknowledged)}; final {sorted(Counter(final.values()).items())}",
        )
    )
    assert [r.status_code for r in during] == [503, 503, 503]
    assert all(_is_problem(r) for r in during[:2])
    assert outage.statuses == {503: 10}
    assert all(_is_problem(r) for r in outage.problems)
    assert stream.no_answer == 0
    assert stream.server_errors == 0, [p.text for p in stream.problems]
    assert recovered.answers[-10:] == [202] * 10  # back by itself, no restart
    assert lost == set()
    assert duplicates == 0


def _is_problem(response: httpx.Response) -> bool:
    return response.headers.get("content-type") == "application/problem+json"
