"""A provider outside the service's CPU: the Twilio simulator (`tests/simulators/twilio.py`,
Twilio's wire format, signed status callbacks) in a process of its own, so the delivery
benchmark measures what the worker and the API spend, and this process's CPU is reported
on its own line.

    python -m bench.provider <file>   # writes its base URL to <file>, serves until killed
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.simulators.twilio import TwilioSimulator


async def main(ready_file: Path) -> None:
    # Callbacks right away (`sent`, then `delivered`), as fast as the API takes them, 64 at
    # a time (the load generator's concurrency elsewhere in the benchmarks).
    async with TwilioSimulator(callback_delay_seconds=0.0, callback_concurrency=64) as twilio:
        await asyncio.to_thread(ready_file.write_text, twilio.base_url)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
