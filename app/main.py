"""Builds the FastAPI app: routers, middleware, error mapping, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from app import embedded
from app.asgi import replay_body
from app.auth.endpoints import router as keys_router
from app.cascade.endpoints import provider_status_fast
from app.cascade.endpoints import router as provider_router
from app.errors import (
    PayloadTooLarge,
    install_error_handlers,
    problem_response,
    problem_types_table,
)
from app.hotpath import HotPaths
from app.inbound.endpoints import router as recipients_router
from app.input_checks import RefuseNulCharacters
from app.logs import configure_logging
from app.messages.endpoints import router as messages_router
from app.messages.endpoints import send_message_fast
from app.messages.receipts import router as receipts_router
from app.observability import install_observability
from app.ops.dashboard.endpoints import install_dashboard
from app.ops.events.endpoints import router as events_router
from app.ops.stats.endpoints import router as stats_router
from app.policy.endpoints import router as policy_router
from app.runtime import Runtime, settle_gc
from app.settings import Settings, production_refusal
from app.templates.endpoints import router as templates_router
from app.webhooks.endpoints import router as webhooks_router

log = structlog.get_logger()

API_DESCRIPTION = """\
One REST API to notify a customer through a **channel cascade** (push → messenger → SMS →
email): the worker tries each step's provider in order and falls over to the next step when
the provider refuses, reports failure, or sends no success receipt within the step's timeout.

Errors are RFC 9457 `application/problem+json` with `type`, `title`, `status`, `detail`
and `errors[]` (`path`, `message`, `type`). `type` is `https://cascade.dev/problems/` and
one of:

""" + problem_types_table()


class BodySizeLimit:
    """Refuses bodies over `limit` bytes (or a path's own limit) with 413 before the app
    parses them."""

    def __init__(
        self, app: ASGIApp, limit: int, limits_by_path: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.limits_by_path = limits_by_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits_by_path.get(scope["path"], self.limit)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read it all, bounded, then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        log.warning("body_too_large", path=scope["path"], limit=limit)
        error = PayloadTooLarge(f"bodies are limited to {limit} bytes")
        await problem_response(error.problem())(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if missing := settings.missing_for_production():
            raise RuntimeError(production_refusal(missing))
        servers = None
        resolved = settings
        if not settings.database_url or not settings.redis_url:
            servers = embedded.start_embedded(
                settings.data_dir,
                database_url=settings.database_url,
                redis_url=settings.redis_url,
                command="api",
            )
            resolved = settings.model_copy(
                update={"database_url": servers.database_url, "redis_url": servers.redis_url}
            )
        runtime = await Runtime.start(resolved)
        app.state.runtime = runtime
        settle_gc()
        try:
            yield
        finally:
            await runtime.close()
            if servers is not None:
                servers.stop()

    # Swagger UI and ReDoc from assets shipped in the package: /docs works offline.
    app = FastAPIOffline(
        title="Cascade",
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        # Metrics are Prometheus (`/metrics`); FastAPI's OpenTelemetry check of the global
        # tracer and meter providers cost ~3 % of a request's CPU, on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    app.include_router(messages_router)
    app.include_router(recipients_router)
    app.include_router(receipts_router)
    app.include_router(provider_router)
    app.include_router(stats_router)
    app.include_router(events_router)
    app.include_router(keys_router)
    install_dashboard(app)
    app.include_router(webhooks_router)
    app.include_router(policy_router)
    app.include_router(templates_router)

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Postgres and Redis answer",
        responses={503: {"description": "A dependency is down"}},
    )
    async def readyz() -> JSONResponse:
        runtime: Runtime = app.state.runtime
        checks: dict[str, Any] = {}
        try:
            async with runtime.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            checks["postgres"] = "ok"
        except Exception as exc:  # readiness reports any failure, it never raises
            checks["postgres"] = f"error: {type(exc).__name__}"
        try:
            await runtime.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    # Innermost of ours: inside the body limit and the request id / metrics.
    app.add_middleware(
        HotPaths,
        exact={"/v1/messages": send_message_fast},
        status_callbacks=provider_status_fast,
    )
    # Inside the size limit: it only ever reads a body already bounded.
    app.add_middleware(RefuseNulCharacters)
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_body_bytes,
        limits_by_path={"/v1/messages/batch": settings.max_batch_body_bytes},
    )
    install_observability(app)
    return app
