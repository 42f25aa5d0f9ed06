"""A provider outside the service's CPU: the Twilio simulator (`tests/simulators/twilio.py`,
Twilio's wire format, signed status callbacks) in a process of its own, so the delivery
benchmark measures what the worker and the API spend, and this process's CPU is reported
on its own line.

    python -m bench.provider <file> [--submit-log <jsonl>]   # writes its base URL to
                                                             # <file>, serves until killed

With `--submit-log`, every send it accepted (201, a Twilio message created) is appended
to that file as a JSON line `{"at", "attempt", "sid", "to"}` within a fraction of a
second, and at SIGTERM: the soak (`bench/soak.py`) counts sends per attempt from it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from pathlib import Path

import orjson

from tests.chaos.stack import attempt_of
from tests.simulators.twilio import TwilioSimulator

LOG_INTERVAL_SECONDS = 0.2


class SubmitLog:
    """Appends the simulator's accepted sends to a JSON-lines file, each once."""

    def __init__(self, twilio: TwilioSimulator, path: Path) -> None:
        self.twilio, self.path = twilio, path
        self.written = 0

    def flush(self) -> None:
        accepted = list(self.twilio.messages.values())[self.written :]
        if not accepted:
            return
        at = time.time()
        with self.path.open("ab") as out:
            for message in accepted:
                attempt = attempt_of({"StatusCallback": message.status_callback or ""})
                record = {"at": at, "attempt": attempt, "sid": message.sid, "to": message.to}
                out.write(orjson.dumps(record) + b"\n")
        self.written += len(accepted)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.flush)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOG_INTERVAL_SECONDS)
        self.flush()


async def main(args: argparse.Namespace) -> None:
    # Callbacks right away (`sent`, then `delivered`), as fast as the API takes them, 64 at
    # a time (the load generator's concurrency elsewhere in the benchmarks).
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with TwilioSimulator(
        callback_delay_seconds=args.callback_delay,
        callback_concurrency=64,
        slow_response_seconds=args.slow_response,
    ) as twilio:
        await asyncio.to_thread(args.ready_file.write_text, twilio.base_url)
        if args.submit_log is None:
            await stop.wait()
        else:
            await SubmitLog(twilio, args.submit_log).run(stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.provider")
    parser.add_argument("ready_file", type=Path)
    parser.add_argument("--submit-log", type=Path)
    parser.add_argument("--callback-delay", type=float, default=0.0, help="seconds per status")
    parser.add_argument("--slow-response", type=float, default=2.0, help="for …0408 numbers")
    asyncio.run(main(parser.parse_args()))
