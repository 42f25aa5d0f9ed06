"""The delivery baseline's worker: bare arq jobs that each do one Postgres update.

Run as its own process (like `cascade worker`), with the same arq settings the
transactional queue gets: `python -m bench.bare_worker QUEUE MAX_JOBS POLL_DELAY`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

import asyncpg
from arq.worker import Worker, func

from app.runtime import redis_settings
from bench.stack import plain_dsn

TOUCH = "UPDATE messages SET updated_at = clock_timestamp() WHERE id = $1 AND category = $2"


async def touch(ctx: dict[str, Any], message_id: str, category: str) -> None:
    await ctx["pool"].execute(TOUCH, uuid.UUID(message_id), category)


async def main(queue: str, max_jobs: int, poll_delay: float) -> None:
    pool = await asyncpg.create_pool(
        plain_dsn(os.environ["CASCADE_DATABASE_URL"]), min_size=10, max_size=20
    )
    worker = Worker(
        functions=[func(touch, name="touch", keep_result=0)],
        queue_name=queue,
        redis_settings=redis_settings(os.environ["CASCADE_REDIS_URL"]),
        ctx={"pool": pool},
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        handle_signals=False,
        keep_result=0,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(worker.async_run())
    print("worker_started", flush=True)
    await stop.wait()
    task.cancel()
    await worker.close()
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
