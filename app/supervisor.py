"""Keeps `cascade dev`'s children running: one that dies is logged and started again after
a backoff, while the others go on serving.

The backoff doubles with each death in a row (0.5 s, 1 s, 2 s … 30 s) and starts over once
a child has stayed up for `STABLE_SECONDS`, so a child that crashes at start cannot spin
the machine, and one that died once an hour restarts at once.

Children come in tiers, started in order, each tier's children using the earlier ones'
(workers post sandbox receipts to the API). They stop in the reverse order: a tier is sent
SIGTERM and waited for before the tier it uses is, so workers finish their sends and post
their receipts to an API still listening. The whole stop is bounded (`STOP_SECONDS`, a
share kept for each later tier); a child still up past its share is SIGKILLed. Children run
in a process group of their own: a terminal's Ctrl-C reaches the supervisor alone, which
stops them in order, instead of every process at the same moment.
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
# A stop's bound, and the part of it kept for each tier stopped after another.
STOP_SECONDS = 40.0
TIER_RESERVE_SECONDS = 8.0
STOP_POLL_SECONDS = 0.05


def restart_delay(deaths_in_a_row: int) -> float:
    """Seconds to wait before starting a child again after its n-th death in a row (n ≥ 1)."""
    doublings = min(max(deaths_in_a_row - 1, 0), 16)
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * (1 << doublings))


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    tier: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    deaths_in_a_row: int = 0
    restart_at: float | None = None  # set while dead, waiting out its backoff
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        tiers: Sequence[Sequence[tuple[str, Sequence[str]]]],
        env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = [
            Child(name, argv, tier) for tier, group in enumerate(tiers) for name, argv in group
        ]
        self.tiers = len(tiers)
        self.env = dict(env)
        self.clock = clock
        self.stopping = False
        self._hurry = False

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, env=self.env, process_group=0)
        child.started_at = self.clock()
        child.restart_at = None

    def check(self) -> None:
        """Notice children that died and start those whose backoff is over."""
        if self.stopping:
            return
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

    def hurry(self) -> None:
        """Asked to stop again while stopping: SIGKILL what still runs, now."""
        self._hurry = True

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop the children, the last tier first, each tier waited for before the one
        before it is sent SIGTERM; all within `timeout`, SIGKILL for those past it."""
        self.stopping = True
        deadline = self.clock() + timeout
        for tier in reversed(range(self.tiers)):
            # Each tier still to stop after this one keeps a share of the bound.
            tier_deadline = max(self.clock(), deadline - tier * TIER_RESERVE_SECONDS)
            self._stop_tier([c for c in self.children if c.tier == tier], tier_deadline)

    def _stop_tier(self, children: Sequence[Child], deadline: float) -> None:
        running = [c for c in children if c.process is not None and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            log.info("child_stopping", child=child.name, pid=child.process.pid)
            child.process.send_signal(signal.SIGTERM)
        while running:
            for child in list(running):
                assert child.process is not None
                code = child.process.poll()
                if code is None and (self._hurry or self.clock() >= deadline):
                    child.process.kill()
                    code = child.process.wait()
                    log.warning("child_killed", child=child.name, pid=child.process.pid)
                if code is not None:
                    running.remove(child)
                    log.info(
                        "child_stopped",
                        child=child.name,
                        pid=child.process.pid,
                        exit_code=code,
                        signal=_signal_name(code),
                    )
            if running:
                time.sleep(STOP_POLL_SECONDS)


def _signal_name(exit_code: int) -> str | None:
    if exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return str(-exit_code)
