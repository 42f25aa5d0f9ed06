"""The long-lived resources a process shares: settings, engine, queue, providers."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import httpx
from arq.connections import ArqRedis, RedisSettings, create_pool
from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth.ratelimit import RequestRateLimit
from app.auth.service import PrincipalCache
from app.cascade.throttle import SendGuards
from app.db import Transaction, create_engine, transaction
from app.queue import JobQueue
from app.settings import Settings
from app.webhooks.presence import EndpointPresence
from providers.accounts import (
    AdapterContext,
    InboundSink,
    ProviderAccount,
    StatusSink,
    check_currencies,
    load_accounts,
)
from providers.base import InboundMessage, StatusUpdate
from providers.pricing import Price
from providers.registry import ProviderRegistry

if TYPE_CHECKING:
    from app.cascade.status_writer import StatusWriter
    from app.messages.writer import AcceptWriter

_gc_settled = False


def settle_gc() -> None:
    """Once per process, after start-up: park the long-lived objects (modules, the app,
    the pools) where the cycle collector no longer walks them, and collect the young
    generation less often. Before, full collections walked the whole ~190 k-object heap
    (~80 ms each) and took about a third of the API's CPU under a batch load."""
    global _gc_settled
    if _gc_settled:
        return
    _gc_settled = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def utcnow() -> datetime:
    return datetime.now(UTC)


def provider_accounts(settings: Settings) -> list[ProviderAccount]:
    accounts = load_accounts(settings.providers, settings.providers_file)
    if settings.sandbox_active and not any(a.name == "sandbox" for a in accounts):
        sandbox = {
            "callback_url": f"{settings.callback_base}/v1/providers/sandbox/status",
            "secret": settings.sandbox_secret.get_secret_value(),
            "delay_seconds": settings.sandbox_delay.total_seconds(),
        }
        # Example prices (so `cascade dev` shows costs and savings), unless the configured
        # accounts price in another currency.
        price = SANDBOX_PRICE if check_currencies(accounts) in (None, "EUR") else None
        accounts.append(
            ProviderAccount(type="sandbox", name="sandbox", config=sandbox, price=price)
        )
    return accounts


SANDBOX_PRICE = Price.model_validate(
    {
        "currency": "EUR",
        "channels": {
            "push": {"per_message": "0.0001"},
            "email": {"per_message": "0.0008"},
            "messenger": {
                "per_message": "0.0085",
                "pricing_categories": {
                    "marketing": "0.0412",
                    "utility": "0.0085",
                    "authentication": "0.0085",
                    "service": "0",
                },
            },
            "sms": {
                "per_segment": "0.0600",
                "prefixes": {"+1": "0.0079", "+44": "0.0390", "+48": "0.0310", "+49": "0.0750"},
            },
        },
    }
)


def build_providers(
    settings: Settings,
    on_status: StatusSink | None = None,
    on_inbound: InboundSink | None = None,
) -> ProviderRegistry:
    """The configured accounts' adapters, each HTTP one with a client of its own."""
    return ProviderRegistry.from_accounts(
        provider_accounts(settings),
        settings.default_providers,
        AdapterContext(on_status=on_status, on_inbound=on_inbound),
    )


def _status_sink(
    engine: AsyncEngine, queue: JobQueue, endpoint_presence: EndpointPresence
) -> StatusSink:
    """Where adapters whose receipts arrive on their own connection (SMPP) report them."""
    from app.cascade.service import record_status

    async def record(provider_name: str, update: StatusUpdate) -> None:
        async with transaction(engine, queue, endpoint_presence=endpoint_presence) as tx:
            await record_status(tx, provider_name, update, utcnow())

    return record


def _inbound_sink(
    engine: AsyncEngine, queue: JobQueue, endpoint_presence: EndpointPresence, settings: Settings
) -> InboundSink:
    """Where adapters whose replies arrive on their own connection (SMPP MOs) report
    them: kept and STOP/START applied as on the inbound route."""
    from app.inbound.service import receive_all

    async def record(provider_name: str, message: InboundMessage) -> None:
        async with transaction(engine, queue, endpoint_presence=endpoint_presence) as tx:
            await receive_all(tx, provider_name, [message], settings, utcnow)

    return record


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 5
    settings.conn_retries = 2
    return settings


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    redis: ArqRedis
    queue: JobQueue
    providers: ProviderRegistry
    # Requests in flight per provider account, across this process's delivery engines
    # (`ProviderAccount.max_in_flight`; its HTTP client's pool is as large).
    _send_slots: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    # API keys this process has seen, for a few seconds (no query per request).
    principals: PrincipalCache = field(default_factory=PrincipalCache)
    # Which tenants have webhook endpoints, for a few seconds (every transaction's).
    endpoint_presence: EndpointPresence = field(default_factory=EndpointPresence)

    def send_slots(self, account: ProviderAccount) -> asyncio.Semaphore:
        slots = self._send_slots.get(account.name)
        if slots is None:
            slots = self._send_slots[account.name] = asyncio.Semaphore(account.max_in_flight)
        return slots

    @cached_property
    def send_guards(self) -> SendGuards:
        """Per-account rate limits and breakers (their Redis scripts registered once)."""
        return SendGuards(self.redis)

    @cached_property
    def request_limit(self) -> RequestRateLimit:
        """The per-API-key request rate limit, with this process's leased slots."""
        settings = self.settings
        return RequestRateLimit(self.redis, settings.api_rate_per_second, settings.api_burst)

    @cached_property
    def webhook_http(self) -> httpx.AsyncClient:
        """The SSRF-checked client customer webhooks are posted with (made on first use)."""
        from app.webhooks.ssrf import checked_client

        settings = self.settings
        return checked_client(
            settings.webhooks_allow_loopback_http, max_connections=settings.webhook_concurrency
        )

    @cached_property
    def accept_writer(self) -> AcceptWriter:
        """The API's group-commit writer of new messages (made on first use)."""
        from app.messages.writer import AcceptWriter

        return AcceptWriter(self.engine, self.queue, self.endpoint_presence, **self._group_commit())

    @cached_property
    def status_writer(self) -> StatusWriter:
        """The API's group-commit writer of provider status reports (made on first use)."""
        from app.cascade.status_writer import StatusWriter

        return StatusWriter(
            self.engine,
            self.queue,
            self.endpoint_presence,
            prices=self.providers.price,
            **self._group_commit(),
        )

    def _group_commit(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "max_items": settings.group_commit_max_items,
            "max_wait": settings.group_commit_max_wait_ms / 1000,
            "max_flushes": settings.group_commit_flushes,
        }

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        if not settings.database_url or not settings.redis_url:
            raise RuntimeError("Runtime needs CASCADE_DATABASE_URL and CASCADE_REDIS_URL resolved")
        engine = create_engine(settings.database_url, settings.db_pool_size)
        redis = await create_pool(redis_settings(settings.redis_url))
        queue = JobQueue(redis)
        presence = EndpointPresence()
        return cls(
            settings=settings,
            engine=engine,
            redis=redis,
            queue=queue,
            providers=build_providers(
                settings,
                _status_sink(engine, queue, presence),
                _inbound_sink(engine, queue, presence, settings),
            ),
            endpoint_presence=presence,
        )

    @asynccontextmanager
    async def transaction(self, *, single_write: bool = False) -> AsyncIterator[Transaction]:
        async with transaction(
            self.engine,
            self.queue,
            single_write=single_write,
            endpoint_presence=self.endpoint_presence,
        ) as tx:
            yield tx

    async def close(self) -> None:
        for writer in ("accept_writer", "status_writer"):
            if writer in self.__dict__:  # made (cached_property) in this process
                await self.__dict__[writer].close()
        if "webhook_http" in self.__dict__:
            await self.webhook_http.aclose()
        await self.providers.aclose()
        await self.redis.aclose()
        await self.engine.dispose()


# async: FastAPI runs a plain `def` dependency on a worker thread, a hop per request.
async def get_runtime(request: Request) -> Runtime:
    """The process's Runtime (FastAPI dependency)."""
    runtime: Runtime = request.app.state.runtime
    return runtime
