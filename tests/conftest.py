"""Real Postgres and Redis for every test: embedded by default, or CASCADE_DATABASE_URL /
CASCADE_REDIS_URL. One fresh database per session (migrated by Alembic), the real API on a
loopback port and the real arq workers in the same event loop. Tests isolate by tenant."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
import uvicorn

from app import embedded, migrate
from app.auth.service import ALL_SCOPES, ensure_tenant, issue_key
from app.main import create_app
from app.runtime import Runtime, utcnow
from app.settings import Settings
from app.worker import run_workers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def servers() -> Iterator[embedded.EmbeddedServers]:
    # Not pytest's tmp_path: that is private to root, and embedded Postgres runs as its own user.
    data_dir = Path(tempfile.mkdtemp(prefix="cascade-test-"))
    data_dir.chmod(0o755)
    started = embedded.start_embedded(
        data_dir,
        database_url=os.environ.get("CASCADE_DATABASE_URL"),
        redis_url=os.environ.get("CASCADE_REDIS_URL"),
    )
    yield started
    started.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(servers: embedded.EmbeddedServers) -> Iterator[str]:
    """A database of its own for this session, so a shared server is never clobbered."""
    assert servers.database_url
    name = f"cascade_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(servers.database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = _with_database(servers.database_url, name)
    migrate.upgrade(url)
    yield url
    asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


def _with_database(url: str, name: str) -> str:
    head, _, tail = url.partition("?")
    base = head.rsplit("/", 1)[0] if head.count("/") > 2 else head
    return f"{base}/{name}" + (f"?{tail}" if tail else "")


@pytest.fixture(scope="session")
def settings(servers: embedded.EmbeddedServers, database_url: str) -> Settings:
    port = _free_port()
    return Settings(
        database_url=database_url,
        redis_url=servers.redis_url,
        public_url=f"http://127.0.0.1:{port}",
        sandbox_delay=timedelta(milliseconds=50),
        worker_poll_delay=0.02,
        # The sweeper is driven explicitly by the tests that need it.
        sweep_interval_seconds=3600,
        retry_base_delay=0.05,
    )


@dataclass
class Service:
    settings: Settings
    base_url: str
    worker_runtime: Runtime
    api_runtime: Runtime


@pytest.fixture(scope="session")
async def service(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings)
    port = int(settings.public_url.rsplit(":", 1)[1])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    api_task = asyncio.create_task(server.serve())
    while not server.started:
        if api_task.done():
            api_task.result()
        await asyncio.sleep(0.01)
    worker_runtime = await Runtime.start(settings)
    await worker_runtime.redis.flushdb()
    stop = asyncio.Event()
    worker_task = asyncio.create_task(run_workers(worker_runtime, stop))
    yield Service(settings, settings.public_url, worker_runtime, app.state.runtime)
    stop.set()
    await worker_task
    await worker_runtime.close()
    server.should_exit = True
    await api_task


@dataclass
class Tenant:
    id: uuid.UUID
    key: str
    client: httpx.AsyncClient


@pytest.fixture
async def tenant(service: Service) -> AsyncIterator[Tenant]:
    async with service.worker_runtime.engine.begin() as conn:
        tenant_id = await ensure_tenant(conn, f"t-{uuid.uuid4().hex[:10]}", utcnow())
        issued = await issue_key(
            conn,
            service.settings.api_key_pepper.get_secret_value(),
            tenant_id,
            "test",
            utcnow(),
            ALL_SCOPES,
        )
    async with httpx.AsyncClient(
        base_url=service.base_url, headers={"Authorization": f"Bearer {issued.key}"}, timeout=10
    ) as client:
        yield Tenant(tenant_id, issued.key, client)


other_tenant = tenant
