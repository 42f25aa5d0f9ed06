"""`cascade dev` stops in order: the workers first (their sends recorded, the sandbox
receipts they owe posted to an API still listening), then the API, then the servers. A
stop with receipts in flight loses none: after a restart every message ends as its
receipt said, none fallen over to its next step for want of one."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import DevStack, _free_port, started_dev_stack
from tests.ops.test_dev_supervision import MARKETING_WORKER, TRANSACTIONAL_WORKER

MESSAGES = 200
# Receipts come this long after a send: the stack is stopped while they are owed.
RECEIPT_DELAY = "PT4S"
# Longer than any stop and restart: a step that falls over did so for a lost receipt.
SMS_TIMEOUT = 60


def _batch() -> dict[str, Any]:
    """Every fifth phone answers with a failure receipt (falls over to email), the others
    with a delivered one; `expect` says which."""
    items = []
    for i in range(MESSAGES):
        fails = i % 5 == 0
        items.append(
            {
                "to": {
                    "phone": f"+486010{i:03d}{'02' if fails else '20'}",
                    "email": f"user{i}-ok@example.com",
                },
                "metadata": {"expect": "email" if fails else "sms"},
            }
        )
    return {
        "category": "transactional",
        "cascade": [{"channel": "sms", "timeout": SMS_TIMEOUT}, {"channel": "email"}],
        "content": {"text": "Your code is 4711", "subject": "Your code"},
        "messages": items,
    }


def _events(stack: DevStack) -> list[dict[str, Any]]:
    found = []
    for line in stack.log_text().splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # two processes' lines interleaved
    return found


def _messages(client: httpx.Client, *statuses: str) -> list[dict[str, Any]]:
    query: list[tuple[str, str | int | float | bool | None]] = [("limit", MESSAGES)]
    query += [("status", s) for s in statuses]
    page = client.get("/v1/messages", params=query)
    assert page.status_code == 200, page.text
    data: list[dict[str, Any]] = page.json()["data"]
    return data


def _wait(probe: Callable[[], bool], within: float, what: str, stack: DevStack) -> None:
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {stack.log_text()[-3000:]}")
        time.sleep(0.1)


def _client(stack: DevStack) -> httpx.Client:
    headers = {"Authorization": f"Bearer {stack.key}"}
    return httpx.Client(base_url=stack.base_url, headers=headers, timeout=10)


def test_sigterm_with_receipts_in_flight_loses_none_stopping_workers_api_servers() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="cascade-dev-"))
    data_dir.chmod(0o755)
    port = _free_port()
    try:
        with started_dev_stack(data_dir, port, CASCADE_SANDBOX_DELAY=RECEIPT_DELAY) as stack:
            with _client(stack) as client:
                accepted = client.post("/v1/messages/batch", json=_batch())
                assert accepted.status_code == 202, accepted.text
                assert accepted.json()["accepted"] == MESSAGES
                # Every send answered and recorded; their receipts are still to come.
                _wait(
                    lambda: sum(e.get("event") == "step_sent" for e in _events(stack)) >= MESSAGES,
                    60,
                    "not all sent",
                    stack,
                )
                in_flight = len(_messages(client, "sending"))
            stack.process.send_signal(signal.SIGTERM)
            try:
                code = stack.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"not stopped: {stack.log_text()[-3000:]}") from None
            assert in_flight > 0  # receipts were owed when the stop began
            assert code == 0, stack.log_text()[-3000:]
            said = stack.log_text()
            for sign in (
                "never retrieved",
                "client has been closed",
                "Traceback",
                "sandbox_receipts_dropped",
                "child_killed",
            ):
                assert sign not in said, said[-3000:]
            order = [
                (e["event"], e.get("child"))
                for e in _events(stack)
                if e.get("event") in ("child_stopping", "child_stopped", "embedded_servers_stopped")
            ]
            workers = {TRANSACTIONAL_WORKER, MARKETING_WORKER}
            assert {c for _, c in order[:4]} == workers, order
            assert {e for e, _ in order[:2]} == {"child_stopping"}, order
            assert order[4:] == [
                ("child_stopping", "api"),
                ("child_stopped", "api"),
                ("embedded_servers_stopped", None),
            ], order

        with (
            started_dev_stack(
                data_dir, port, "dev-restarted.log", CASCADE_SANDBOX_DELAY=RECEIPT_DELAY
            ) as stack,
            _client(stack) as client,
        ):
            # Anything handed back unsent is sent now; nothing is left waiting for a step
            # timeout, so every message is final long before one could pass.
            _wait(
                lambda: not _messages(client, "accepted", "queued", "sending"),
                SMS_TIMEOUT / 2,
                "messages left unfinished",
                stack,
            )
            ended = _messages(client)
        assert len(ended) == MESSAGES
        outcomes = {
            (
                m["metadata"]["expect"],
                m["status"],
                m["delivered_channel"],
                (m["last_error"] or {}).get("code"),
            )
            for m in ended
        }
        assert outcomes == {
            ("sms", "delivered", "sms", None),
            ("email", "delivered", "email", "sandbox:undeliverable"),
        }, outcomes
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
