"""`cascade dev` supervises its children: one killed is logged and started again after a
backoff, and the others keep serving meanwhile; a stop takes the last tier first."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from app.supervisor import MAX_BACKOFF_SECONDS, TIER_RESERVE_SECONDS, Supervisor, restart_delay
from tests.conftest import DevStack, started_dev_stack
from tests.ops.test_dev_stack import deliver_one

TRANSACTIONAL_WORKER = "worker transactional,service,webhooks"
MARKETING_WORKER = "worker marketing"


@pytest.fixture(scope="module")
def own_dev_stack() -> Iterator[DevStack]:
    """Not the shared stack: this test kills its children."""
    with started_dev_stack() as stack:
        yield stack


def _children(pid: int) -> dict[str, int]:
    """The API and worker processes `cascade dev` runs (not its embedded servers), by name."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue  # exited meanwhile
            words = [a.decode() for a in argv if a]
            if "uvicorn" in words:
                found["api"] = int(child)
            elif "worker" in words and "--queues" in words:
                found[f"worker {words[words.index('--queues') + 1]}"] = int(child)
    return found


def _restarted(stack: DevStack, name: str, old_pid: int, within: float = 60) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pid = _children(stack.process.pid).get(name)
        if pid is not None and pid != old_pid:
            return pid
        time.sleep(0.1)
    raise AssertionError(f"{name} not restarted: {stack.log_text()[-3000:]}")


def _ready(stack: DevStack, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the API did not come back: {stack.log_text()[-3000:]}")


def test_a_killed_worker_or_api_is_restarted_while_the_rest_keep_serving(
    own_dev_stack: DevStack,
) -> None:
    stack = own_dev_stack
    before = _children(stack.process.pid)
    assert set(before) == {"api", TRANSACTIONAL_WORKER, MARKETING_WORKER}, before

    os.kill(before[MARKETING_WORKER], signal.SIGKILL)
    # The API and the other worker never noticed: a transactional message goes through.
    assert httpx.get(f"{stack.base_url}/readyz", timeout=5).status_code == 200
    assert deliver_one(stack, stack.key)["status"] == "delivered"
    _restarted(stack, MARKETING_WORKER, before[MARKETING_WORKER])

    os.kill(before[TRANSACTIONAL_WORKER], signal.SIGKILL)
    # Accepted while its worker is down, delivered by the one started in its place.
    assert deliver_one(stack, stack.key)["status"] == "delivered"
    _restarted(stack, TRANSACTIONAL_WORKER, before[TRANSACTIONAL_WORKER])

    os.kill(before["api"], signal.SIGKILL)
    _restarted(stack, "api", before["api"])
    _ready(stack)
    assert deliver_one(stack, stack.key)["status"] == "delivered"

    assert stack.process.poll() is None
    log = stack.log_text()
    for name in ("api", TRANSACTIONAL_WORKER, MARKETING_WORKER):
        assert f'"child": "{name}"' in log and '"SIGKILL"' in log, log[-3000:]
    assert log.count('"event": "child_restarted"') == 3, log[-3000:]


def test_restarts_back_off_doubling_to_a_bound() -> None:
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert delays == sorted(delays)
    assert delays[-1] == MAX_BACKOFF_SECONDS


def test_a_stop_takes_the_last_tier_first_and_kills_only_a_child_past_its_share(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    stubborn = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f" pathlib.Path({str(ready)!r}).touch(); time.sleep(600)"
    )
    polite = "import time; time.sleep(600)"
    supervisor = Supervisor(
        [
            [("api", [sys.executable, "-c", polite])],
            [
                ("worker a", [sys.executable, "-c", stubborn]),
                ("worker b", [sys.executable, "-c", polite]),
            ],
        ],
        os.environ,
    )
    supervisor.start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the stubborn child never started"
        time.sleep(0.05)

    # The workers' tier has a second; the API's share of the bound is kept for it.
    with capture_logs() as logs:
        supervisor.stop(timeout=TIER_RESERVE_SECONDS + 1)

    steps = [(e["event"], e["child"], e.get("signal")) for e in logs]
    assert set(steps[:2]) == {
        ("child_stopping", "worker a", None),
        ("child_stopping", "worker b", None),
    }, steps
    assert set(steps[2:5]) == {
        ("child_stopped", "worker b", "SIGTERM"),
        ("child_killed", "worker a", None),
        ("child_stopped", "worker a", "SIGKILL"),
    }, steps
    assert steps[5:] == [("child_stopping", "api", None), ("child_stopped", "api", "SIGTERM")]
