"""Keeps `cascade dev`'s children running: one that dies is logged and started again after
a backoff, while the others go on serving.

The backoff doubles with each death in a row (0.5 s, 1 s, 2 s … 30 s) and starts over once
a child has stayed up for `STABLE_SECONDS`, so a child that crashes at start cannot spin
the machine, and one that died once an hour restarts at once.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger()

FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STABLE_SECONDS = 60.0


def restart_delay(deaths_in_a_row: int) -> float:
    """Seconds to wait before starting a child again after its n-th death in a row (n ≥ 1)."""
    doublings = min(max(deaths_in_a_row - 1, 0), 16)
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * (1 << doublings))


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    deaths_in_a_row: int = 0
    restart_at: float | None = None  # set while dead, waiting out its backoff
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        children: Sequence[tuple[str, Sequence[str]]],
        env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = [Child(name, argv) for name, argv in children]
        self.env = dict(env)
        self.clock = clock

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, env=self.env)
        child.started_at = self.clock()
        child.restart_at = None

    def check(self) -> None:
        """Notice children that died and start those whose backoff is over."""
        now = self.clock()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)
                    assert child.process is not None
                    log.warning(
                        "child_restarted",
                        child=child.name,
                        pid=child.process.pid,
                        restarts=child.restarts,
                    )
                continue
            assert child.process is not None
            code = child.process.poll()
            if code is None:
                continue
            if now - child.started_at >= STABLE_SECONDS:
                child.deaths_in_a_row = 0
            child.deaths_in_a_row += 1
            delay = restart_delay(child.deaths_in_a_row)
            child.restart_at = now + delay
            log.error(
                "child_died",
                child=child.name,
                pid=child.process.pid,
                exit_code=code,
                signal=_signal_name(code),
                restart_in_seconds=delay,
            )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every running child, then SIGKILL those still up after `timeout`."""
        running = [
            c.process for c in self.children if c.process is not None and c.process.poll() is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _signal_name(exit_code: int) -> str | None:
    if exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return str(-exit_code)
