"""The long-lived resources a process shares: settings, engine, queue, providers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import Transaction, create_engine, transaction
from app.queue import JobQueue
from app.settings import Settings
from providers.base import Channel, Provider
from providers.registry import ProviderRegistry
from providers.sandbox import SandboxConfig, SandboxProvider


def utcnow() -> datetime:
    return datetime.now(UTC)


def build_providers(settings: Settings, http: httpx.AsyncClient) -> ProviderRegistry:
    sandbox = SandboxConfig(
        callback_url=f"{settings.callback_base}/v1/providers/sandbox/status",
        secret=settings.sandbox_secret,
        delay_seconds=settings.sandbox_delay.total_seconds(),
    )
    providers: list[Provider] = [SandboxProvider(ch, sandbox, http=http) for ch in Channel]
    return ProviderRegistry(providers, settings.default_providers)


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
    http: httpx.AsyncClient

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        if not settings.database_url or not settings.redis_url:
            raise RuntimeError("Runtime needs CASCADE_DATABASE_URL and CASCADE_REDIS_URL resolved")
        engine = create_engine(settings.database_url, settings.db_pool_size)
        redis = await create_pool(redis_settings(settings.redis_url))
        http = httpx.AsyncClient(timeout=10.0)
        return cls(
            settings=settings,
            engine=engine,
            redis=redis,
            queue=JobQueue(redis),
            providers=build_providers(settings, http),
            http=http,
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with transaction(self.engine, self.queue) as tx:
            yield tx

    async def close(self) -> None:
        await self.providers.aclose()
        await self.http.aclose()
        await self.redis.aclose()
        await self.engine.dispose()
