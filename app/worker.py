"""arq workers: one per traffic category, each on its own queue with its own concurrency.

Separate queues mean a marketing campaign waits in its own line: transactional jobs
are picked by their own worker however long the marketing queue is.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import structlog
from arq.cron import cron
from arq.worker import Worker, func

from app.cascade import jobs
from app.queue import queue_name
from app.runtime import Runtime, redis_settings
from providers.base import Category

log = structlog.get_logger()

JOB_TIMEOUT_SECONDS = 60


def build_workers(runtime: Runtime) -> list[Worker]:
    settings = runtime.settings
    functions = [
        func(jobs.send_step, name="send_step", timeout=JOB_TIMEOUT_SECONDS, keep_result=0),
        func(jobs.step_deadline, name="step_deadline", timeout=JOB_TIMEOUT_SECONDS, keep_result=0),
    ]
    interval = max(1, settings.sweep_interval_seconds)
    workers = []
    for category in Category:
        cron_jobs = (
            [
                cron(
                    jobs.sweep,
                    name="sweep",
                    second=set(range(0, 60, interval)),
                    unique=True,
                    run_at_startup=True,
                    keep_result=0,
                )
            ]
            if category is Category.TRANSACTIONAL
            else []
        )
        workers.append(
            Worker(
                functions=functions,
                cron_jobs=cron_jobs,
                queue_name=queue_name(category),
                # Each worker owns its pool: Worker.close() closes the pool it was given.
                redis_settings=redis_settings(settings.redis_url or ""),
                ctx={"runtime": runtime},
                max_jobs=settings.worker_concurrency[category],
                poll_delay=settings.worker_poll_delay,
                handle_signals=False,
                keep_result=0,
                job_completion_wait=10,
            )
        )
    return workers


async def run_workers(runtime: Runtime, stop: asyncio.Event) -> None:
    """Run all category workers until `stop` is set, then let in-flight jobs finish."""
    workers = build_workers(runtime)
    tasks = [asyncio.create_task(worker.async_run()) for worker in workers]
    log.info("worker_started", queues=[w.queue_name for w in workers])
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for worker in workers:
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
    await asyncio.gather(*tasks, return_exceptions=True)
    for worker in workers:
        await worker.close()
    waiter.cancel()


async def serve(runtime_factory: Any) -> None:
    runtime: Runtime = await runtime_factory()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_workers(runtime, stop)
    finally:
        await runtime.close()
