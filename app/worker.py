"""Worker processes: a delivery engine per traffic category, plus arq for side jobs.

Each category has its own engine (`app/cascade/engine.py`) claiming only its own
messages, with its own capacity: transactional messages are claimed by their own loop
however many marketing messages are due. A separate loop is not a separate CPU, though:
`cascade worker --queues` runs a subset per process, so a marketing backlog can be drained
by a process of its own (run at a lower priority with `--nice`) instead of taking the
event loop transactional sends run on. arq runs what is still a job: customer webhooks
(a queue of their own), withdrawing a send at a provider, and the hourly prune.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Collection, Iterable
from typing import Any

import structlog
from arq.cron import cron
from arq.typing import StartupShutdown
from arq.worker import Worker, func
from redis.exceptions import RedisError

from app.cascade import jobs
from app.cascade.engine import DeliveryEngine
from app.policy import jobs as policy_jobs
from app.queue import WEBHOOKS_QUEUE, queue_name
from app.runtime import Runtime, redis_settings, settle_gc
from app.webhooks import jobs as webhook_jobs
from providers.base import Category

log = structlog.get_logger()


WEBHOOKS = "webhooks"
# What `cascade worker --queues` accepts, in the order the workers are built.
QUEUES: tuple[str, ...] = (*(category.value for category in Category), WEBHOOKS)


# The recommended split over processes (`cascade dev` and the isolation benchmark run it):
# (queues, nice increment) per `cascade worker` process.
PROCESS_SPLIT: tuple[tuple[str, int], ...] = (
    ("transactional,service,webhooks", 0),
    ("marketing", 10),
)


def parse_queues(values: Iterable[str]) -> tuple[str, ...]:
    """Queue names from repeated and/or comma-separated values, in `QUEUES` order.

    Nothing given means every queue; an unknown name is a ValueError naming the choices.
    """
    wanted = {name.strip() for value in values for name in value.split(",") if name.strip()}
    unknown = sorted(wanted.difference(QUEUES))
    if unknown:
        raise ValueError(
            f"unknown queue {', '.join(repr(u) for u in unknown)}; choose from {', '.join(QUEUES)}"
        )
    return tuple(name for name in QUEUES if name in wanted) or QUEUES


def build_workers(runtime: Runtime, queues: Collection[str] = QUEUES) -> list[Worker]:
    """The arq workers for `queues` (names from `QUEUES`): a category's queue carries its
    side jobs (withdrawing sends at providers; the marketing prune on marketing's), and
    arq's `unique=True` keeps a cron job to one run per tick across processes."""
    settings = runtime.settings
    timeout = settings.job_timeout_seconds
    functions = [
        func(
            jobs.cancel_provider_send, name="cancel_provider_send", timeout=timeout, keep_result=0
        ),
    ]
    workers = []
    for category in Category:
        if category.value not in queues:
            continue
        cron_jobs = []
        if category is Category.MARKETING:
            # Hourly: marketing sends older than the retention no longer count for anything.
            cron_jobs.append(
                cron(
                    policy_jobs.prune_marketing_sends,
                    name="prune_marketing_sends",
                    minute=17,
                    second=0,
                    unique=True,
                    keep_result=0,
                )
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
                job_timeout=timeout,
                poll_delay=settings.worker_poll_delay,
                handle_signals=False,
                keep_result=0,
                job_completion_wait=10,
            )
        )
    if WEBHOOKS in queues:
        workers.append(webhook_worker(runtime))
    return workers


def webhook_worker(runtime: Runtime) -> Worker:
    """Customer webhooks on a queue of their own: slow receivers never delay sending."""
    settings = runtime.settings
    return Worker(
        functions=[
            func(webhook_jobs.dispatch_webhooks, name="dispatch_webhooks", keep_result=0),
            func(webhook_jobs.deliver_webhook, name="deliver_webhook", keep_result=0),
        ],
        cron_jobs=[
            cron(
                webhook_jobs.sweep_webhooks,
                name="sweep_webhooks",
                second=set(range(0, 60, max(1, settings.sweep_interval_seconds))),
                unique=True,
                run_at_startup=True,
                keep_result=0,
            )
        ],
        queue_name=WEBHOOKS_QUEUE,
        redis_settings=redis_settings(settings.redis_url or ""),
        ctx={"runtime": runtime},
        max_jobs=settings.webhook_concurrency,
        job_timeout=settings.job_timeout_seconds,
        poll_delay=settings.worker_poll_delay,
        handle_signals=False,
        keep_result=0,
        job_completion_wait=10,
    )


async def run_workers(
    runtime: Runtime, stop: asyncio.Event, queues: Collection[str] = QUEUES
) -> None:
    """Run the workers for `queues` until `stop` is set, then let in-flight jobs finish.

    Every worker process binds its own provider sessions (SMPP), whichever queues it runs:
    receipts arrive on any bind and each is recorded wherever it lands. With the queues
    split over N processes an SMPP account sees N binds, so its bind limit must allow them.
    """
    workers = build_workers(runtime, queues)
    engines = [DeliveryEngine(runtime, c.value) for c in Category if c.value in queues]
    await runtime.providers.connect_sessions()
    tasks = [asyncio.create_task(run_through_redis_outages(w, stop)) for w in workers]
    tasks += [asyncio.create_task(engine.run(stop)) for engine in engines]
    log.info("worker_started", queues=[w.queue_name for w in workers])
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    for worker in workers:
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
    await asyncio.gather(*tasks, return_exceptions=True)
    for worker in workers:
        try:
            await worker.close()
        except (RedisError, OSError) as exc:
            log.warning("worker_close_failed", queue=worker.queue_name, error=repr(exc))
    waiter.cancel()


# A lost Redis ends arq's poll loop; rather than the process exiting, the worker resumes
# after this pause (redis-py reconnects on the next command; jobs in flight carry on).
REDIS_RETRY_SECONDS = 1.0


async def run_through_redis_outages(worker: Worker, stop: asyncio.Event) -> None:
    if worker.on_startup is not None:
        worker.on_startup = _once(worker.on_startup)  # arq calls it on every (re)start
    while True:
        try:
            await worker.async_run()
            return
        except (RedisError, OSError) as exc:
            if stop.is_set():
                return
            log.warning("worker_lost_redis", queue=worker.queue_name, error=repr(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REDIS_RETRY_SECONDS)
        if stop.is_set():
            return


def _once(startup: StartupShutdown) -> StartupShutdown:
    done = False

    async def run(ctx: dict[Any, Any]) -> None:
        nonlocal done
        if not done:
            await startup(ctx)
            done = True

    return run


async def serve(runtime_factory: Any, queues: Collection[str] = QUEUES) -> None:
    runtime: Runtime = await runtime_factory()
    settle_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_workers(runtime, stop, queues)
    finally:
        await runtime.close()
