"""Prometheus metrics, request ids and the log context of a message.

Each process counts what it does: the API counts accepted messages and the provider
callbacks it applies, the worker counts sends and timeouts. Prometheus adds the targets up
(scrape the API's `/metrics` and each worker's `--metrics-port`). With several API
processes (`cascade api --workers N`) set `PROMETHEUS_MULTIPROC_DIR` and `/metrics`
answers for all of them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterable
from datetime import datetime

import structlog
from fastapi import FastAPI, Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.cascade.machine import AttemptStatus
from app.queue import queue_name
from providers.base import Category

MESSAGES_ACCEPTED = Counter(
    "cascade_messages_accepted",
    "Messages accepted by the API (202 committed; idempotent replays not counted).",
    ["category"],
)
ATTEMPTS = Counter(
    "cascade_attempts",
    "Attempts reaching a status: sent (the provider took it), delivered, read, failed,"
    " rejected, expired.",
    ["category", "channel", "provider", "status"],
)
MESSAGES_FINISHED = Counter(
    "cascade_messages_finished",
    "Messages reaching a final status, by the channel of the step they ended on.",
    ["category", "channel", "status"],
)
PROVIDER_SEND_SECONDS = Histogram(
    "cascade_provider_send_seconds",
    "From claiming a step to the provider's answer to the send (the last try).",
    ["provider", "channel", "outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PROVIDER_RECEIPT_SECONDS = Histogram(
    "cascade_provider_receipt_seconds",
    "From the provider taking a send to its delivery or failure receipt.",
    ["provider", "channel", "status"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
WEBHOOK_DELIVERIES = Counter(
    "cascade_webhook_deliveries",
    "Customer webhook delivery attempts, counted once committed, by outcome: succeeded,"
    " retrying (failed, another attempt scheduled) or failed (no more attempts).",
    ["outcome"],
)
HTTP_REQUESTS = Counter(
    "cascade_http_requests", "HTTP requests served.", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "cascade_http_request_seconds",
    "HTTP request duration.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

_RECEIPT_STATUSES = frozenset({AttemptStatus.DELIVERED, AttemptStatus.READ, AttemptStatus.FAILED})


def count_accepted(category: str) -> None:
    MESSAGES_ACCEPTED.labels(category).inc()


def count_message_finished(category: str, channel: str, status: str) -> None:
    MESSAGES_FINISHED.labels(category, channel, status).inc()


def count_webhook_delivery(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def observe_attempt(
    *,
    category: str,
    channel: str,
    provider: str,
    before: AttemptStatus,
    after: AttemptStatus,
    source: str,
    claimed_at: datetime,
    sent_at: datetime | None,
    at: datetime,
) -> None:
    """Count an attempt's status change and time the provider where this change allows."""
    ATTEMPTS.labels(category, channel, provider, after.value).inc()
    if source == "worker" and before is AttemptStatus.SENDING:
        # The worker claimed the step (updated_at) and now has the provider's answer.
        PROVIDER_SEND_SECONDS.labels(provider, channel, after.value).observe(
            max(0.0, (at - claimed_at).total_seconds())
        )
    elif source == "provider" and sent_at is not None and after in _RECEIPT_STATUSES:
        PROVIDER_RECEIPT_SECONDS.labels(provider, channel, after.value).observe(
            max(0.0, (at - sent_at).total_seconds())
        )


def bind_message(
    message_id: uuid.UUID, tenant_id: uuid.UUID, category: str, attempt_id: uuid.UUID | None
) -> None:
    """Every later log line of this job or request names the message, attempt and tenant."""
    structlog.contextvars.bind_contextvars(
        message_id=f"msg_{message_id.hex}",
        tenant=str(tenant_id),
        category=category,
        **({"attempt": f"att_{attempt_id.hex}"} if attempt_id else {}),
    )


class QueueDepth(Collector):
    """Jobs waiting in each category's arq queue, read at scrape time."""

    def __init__(self, ready: dict[str, int], deferred: dict[str, int]) -> None:
        self.ready = ready
        self.deferred = deferred

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "cascade_queue_depth",
            "Jobs in a category's queue: ready to run now, or deferred (retries, deadlines).",
            labels=["category", "state"],
        )
        for category in self.ready:
            gauge.add_metric([category, "ready"], self.ready[category])
            gauge.add_metric([category, "deferred"], self.deferred[category])
        yield gauge


async def metrics_response(redis: Redis) -> Response:
    """The Prometheus exposition: this process's (or all processes') metrics + queue depth."""
    now_ms = int(time.time() * 1000)
    ready: dict[str, int] = {}
    deferred: dict[str, int] = {}
    for category in Category:
        # arq keeps a queue as a sorted set scored by the time the job may run.
        ready[category.value] = int(await redis.zcount(queue_name(category), "-inf", now_ms))
        deferred[category.value] = int(
            await redis.zcount(queue_name(category), f"({now_ms}", "+inf")
        )
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    scrape = CollectorRegistry()
    scrape.register(QueueDepth(ready, deferred))
    body = generate_latest(registry) + generate_latest(scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestContext:
    """`X-Request-ID` in (when well-formed) or a new one, echoed out, bound into the logs;
    and the request counted and timed by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value  # the last one, as before
        request_id = given.decode("latin-1")
        if not _REQUEST_ID.match(request_id):
            request_id = secrets.token_hex(16)  # as uuid4().hex looked, at a third of the cost
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            counted, timed = _request_metrics(scope.get("method", ""), template, status)
            counted.inc()
            timed.observe(time.perf_counter() - started)


@functools.lru_cache(maxsize=1024)
def _request_metrics(method: str, template: str, status: int) -> tuple[Counter, Histogram]:
    # A metric's `labels()` lookup cost more than the count itself, on every request.
    return HTTP_REQUESTS.labels(method, template, str(status)), HTTP_SECONDS.labels(
        method, template
    )


def install_observability(app: FastAPI) -> None:
    """`/metrics` and the request-id middleware (added last: it wraps everything else)."""

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return await metrics_response(request.app.state.runtime.redis)

    app.add_middleware(RequestContext)
