"""The worker is killed (SIGKILL) or stopped (SIGTERM) mid-stream: nothing lost or sent twice."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter

import pytest

from tests.chaos.report import FaultRow
from tests.chaos.stack import ChaosStack, StreamResult, sms_body

SEED = 20_260_701
STREAM = 200
KILLS = 5

DELIVERED = "+48600100200"
UNDELIVERED = "+48600100999"  # Twilio reports `undelivered`: falls over to email
INVALID = "+48600100211"  # Twilio refuses it (21211): falls over at once
SLOW = "+48600100408"  # Twilio answers after 1.5 s: keeps sends in flight
PHONES = [DELIVERED] * 10 + [UNDELIVERED, INVALID] * 2 + [SLOW] * 6


@pytest.mark.timeout(240)
async def test_worker_killed_at_random_points_loses_nothing_and_sends_each_attempt_once(
    stack: ChaosStack, report_fault: list[FaultRow]
) -> None:
    rng = random.Random(SEED)
    tenant = await stack.new_tenant()
    bodies = [sms_body(rng.choice(PHONES)) for _ in range(STREAM)]
    stream = StreamResult()
    caught_sending: list[int] = []  # attempts in `sending` right after each kill

    for chunk in (bodies[i::KILLS] for i in range(KILLS)):
        # The successor is up before the kill, as a supervisor would have it; both take
        # part of the chunk, and the kill lands at a random point of its processing.
        doomed = await stack.replace_worker()
        sending = asyncio.create_task(tenant.send_stream(chunk, concurrency=4))
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        await doomed.kill()
        in_flight = await stack.attempt_statuses(await stack.message_ids(tenant.id))
        caught_sending.append(in_flight["sending"])
        stream.extend(await sending)

    final = await stack.wait_until_final(tenant.id, within=90)
    lost = set(stream.accepted) - set(final)
    duplicates = await stack.duplicate_submits(stream.accepted)
    report_fault.append(
        FaultRow(
            "worker SIGKILL mid-stream",
            len(caught_sending),
            STREAM,
            len(lost),
            duplicates,
            stream.server_errors,
            f"seed {SEED}; attempts in flight at each kill {caught_sending}; "
            f"final {sorted(Counter(final.values()).items())}",
        )
    )
    assert stream.statuses == {202: STREAM}
    assert len(final) == STREAM
    assert lost == set()
    assert duplicates == 0


@pytest.mark.timeout(120)
async def test_sigterm_lets_in_flight_sends_finish_and_leaves_nothing_sending(
    stack: ChaosStack, report_fault: list[FaultRow]
) -> None:
    tenant = await stack.new_tenant()
    stream = await tenant.send_stream([sms_body(SLOW) for _ in range(20)], concurrency=10)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (await stack.attempt_statuses(stream.accepted))["sending"] < 5:
        assert loop.time() < deadline, "the worker never had sends in flight"
        await asyncio.sleep(0.05)
    in_flight = await stack.attempt_statuses(stream.accepted)

    stack.worker.send(signal.SIGTERM)
    exit_code = await stack.worker.wait(within=30)  # arq waits ≤ 10 s for running jobs
    after_stop = await stack.attempt_statuses(stream.accepted)
    await stack.start_worker()
    final = await stack.wait_until_final(tenant.id, within=60)
    duplicates = await stack.duplicate_submits(stream.accepted)

    report_fault.append(
        FaultRow(
            "worker SIGTERM with sends in flight",
            1,
            len(stream.accepted),
            len(set(stream.accepted) - set(final)),
            duplicates,
            stream.server_errors,
            f"{in_flight['sending']} in flight at SIGTERM, {after_stop['sending']} left sending",
        )
    )
    assert exit_code == 0
    assert after_stop["sending"] == 0
    assert set(final) == set(stream.accepted)
    assert set(final.values()) == {"delivered"}
    assert duplicates == 0
