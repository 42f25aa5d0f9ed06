"""The service under test: Postgres and Redis, a fresh migrated database, the real processes.

Embedded servers by default, or the ones `CASCADE_DATABASE_URL` / `CASCADE_REDIS_URL`
name (a database of its own is created on that server and dropped at the end; the Redis
database is flushed between benchmarks). `cascade api` and `cascade worker` run as
subprocesses with their output in `<data dir>/logs/`, bound to 127.0.0.1 only; the
worker either as one process for every queue or split over two as `cascade dev` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from app import embedded, migrate
from app.auth.service import ensure_tenant, issue_key
from app.db import create_engine
from app.runtime import utcnow
from app.settings import Settings
from app.worker import PROCESS_SPLIT

ROOT = Path(__file__).resolve().parent.parent
LEDGER_TABLES = "messages, attempts, events, idempotency_keys"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(url: str, name: str) -> str:
    head, _, tail = url.partition("?")
    base = head.rsplit("/", 1)[0] if head.count("/") > 2 else head
    return f"{base}/{name}" + (f"?{tail}" if tail else "")


def plain_dsn(url: str) -> str:
    """What asyncpg accepts: no SQLAlchemy driver suffix."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)


@dataclass
class Stack:
    """Servers + database + key; starts and stops the service processes on demand."""

    data_dir: Path
    servers: embedded.EmbeddedServers
    server_url: str
    database_url: str
    redis_url: str
    database_name: str
    api_key: str = ""
    tenant_id: uuid.UUID | None = None
    env_overrides: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    api_port: int = 0

    @classmethod
    def start(cls) -> Stack:
        data_dir = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
        # Embedded Postgres runs as its own system user when we are root: it needs to enter.
        data_dir.chmod(0o755)
        servers = embedded.start_embedded(
            data_dir,
            database_url=os.environ.get("CASCADE_DATABASE_URL"),
            redis_url=os.environ.get("CASCADE_REDIS_URL"),
        )
        assert servers.database_url and servers.redis_url
        name = f"cascade_bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_admin(servers.database_url, f'CREATE DATABASE "{name}"'))
        url = with_database(servers.database_url, name)
        migrate.upgrade(url)
        stack = cls(
            data_dir=data_dir,
            servers=servers,
            server_url=servers.database_url,
            database_url=url,
            redis_url=servers.redis_url,
            database_name=name,
        )
        (data_dir / "logs").mkdir()
        asyncio.run(stack._issue_key())
        asyncio.run(stack._warm_up())
        return stack

    async def _warm_up(self) -> None:
        """Write (and drop) ~300 MB so Postgres has its WAL segments: a fresh server creates
        and zero-fills each one on first use, which slowed whichever benchmark came first."""
        conn = await asyncpg.connect(plain_dsn(self.database_url))
        try:
            await conn.execute(
                "CREATE TABLE bench_warm_up AS"
                " SELECT i, repeat('x', 1000) AS pad FROM generate_series(1, 300000) AS i"
            )
            await conn.execute("DROP TABLE bench_warm_up")
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def _issue_key(self) -> None:
        engine = create_engine(self.database_url, 1)
        pepper = Settings().api_key_pepper.get_secret_value()
        try:
            async with engine.begin() as conn:
                self.tenant_id = await ensure_tenant(conn, "bench", utcnow())
                issued = await issue_key(conn, pepper, self.tenant_id, "bench", utcnow())
        finally:
            await engine.dispose()
        self.api_key = issued.key

    # Processes

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "CASCADE_DATABASE_URL": self.database_url,
            "CASCADE_REDIS_URL": self.redis_url,
            "CASCADE_PUBLIC_URL": f"http://127.0.0.1:{self.api_port}",
            "CASCADE_DATA_DIR": str(self.data_dir / "service"),
            "CASCADE_DEV_MODE": "true",
            # The per-key request limit (100/s by default) would cap every figure: the
            # check still runs on every request, it just never refuses.
            "CASCADE_API_RATE_PER_SECOND": "1000000",
            "CASCADE_API_BURST": "1000000",
            **self.env_overrides,
            **extra,
        }

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        """`python -m <args>` with its output in the logs folder."""
        log_path = self.data_dir / "logs" / f"{name}-{len(self.processes)}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def start_api(self, workers: int = 1, **extra_env: str) -> Process:
        self.api_port = free_port()
        process = self.spawn(
            "api",
            [
                "app.cli",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--workers",
                str(workers),
            ],
            self.env(**extra_env),
        )
        self._wait_ready(process)
        return process

    def start_worker(
        self, module: list[str] | None = None, *, split: bool = False, **extra_env: str
    ) -> list[Process]:
        """`cascade worker` for every queue, or (`split`) one process per entry of
        `PROCESS_SPLIT` as `cascade dev` runs them; `module`: another worker to run."""
        if module is not None:
            commands = [module]
        elif split:
            commands = [
                ["app.cli", "worker", "--queues", queues, "--nice", str(nice)]
                for queues, nice in PROCESS_SPLIT
            ]
        else:
            commands = [["app.cli", "worker"]]
        processes = [self.spawn(args[0], args, self.env(**extra_env)) for args in commands]
        deadline = time.monotonic() + 30
        waiting = list(processes)
        while waiting and time.monotonic() < deadline:
            for process in list(waiting):
                if process.popen.poll() is not None:
                    raise RuntimeError(f"the worker exited; see {process.log_path}")
                if b"worker_started" in process.log_path.read_bytes():
                    waiting.remove(process)
            time.sleep(0.1)
        if waiting:
            raise RuntimeError(f"the worker did not start; see {waiting[0].log_path}")
        return processes

    def _wait_ready(self, process: Process) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited; see {process.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(f"http://127.0.0.1:{self.api_port}/readyz", timeout=2)
                if answer.status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{process.name} not ready; see {process.log_path}")

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    @contextlib.contextmanager
    def running(self, *, api_workers: int = 0, worker: bool = False) -> Iterator[None]:
        try:
            if api_workers:
                self.start_api(api_workers)
            if worker:
                self.start_worker()
            yield
        finally:
            self.stop_processes()

    # State between benchmarks

    async def reset(self) -> None:
        """Empty the ledger and the queues: every benchmark starts from the same state."""
        conn = await asyncpg.connect(plain_dsn(self.database_url))
        try:
            await conn.execute(f"TRUNCATE {LEDGER_TABLES} CASCADE")
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()
        await self.reset_queues()

    async def reset_queues(self) -> None:
        client = aioredis.from_url(self.redis_url)  # type: ignore[no-untyped-call]
        try:
            await client.flushdb()
        finally:
            await client.aclose()

    def close(self) -> None:
        self.stop_processes()
        with contextlib.suppress(Exception):
            asyncio.run(
                _admin(self.server_url, f'DROP DATABASE "{self.database_name}" WITH (FORCE)')
            )
        self.servers.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
