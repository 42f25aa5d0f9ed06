"""Real Postgres and Redis for every test: embedded by default, or CASCADE_DATABASE_URL /
CASCADE_REDIS_URL. One fresh database per session (migrated by Alembic), the real API on a
loopback port and the real arq workers in the same event loop. Tests isolate by tenant."""

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
from tests.simulators.fcm import FcmSimulator, ServiceAccount
from tests.simulators.smpp import SmscSimulator
from tests.simulators.smtp import SmtpSimulator
from tests.simulators.telegram import TelegramSimulator
from tests.simulators.twilio import TwilioSimulator
from tests.simulators.viber import ViberSimulator
from tests.simulators.whatsapp import WhatsAppSimulator


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


@dataclass
class Simulators:
    twilio: TwilioSimulator
    whatsapp: WhatsAppSimulator
    telegram: TelegramSimulator
    fcm: FcmSimulator
    smtp: SmtpSimulator
    smsc: SmscSimulator
    viber: ViberSimulator


@pytest.fixture(scope="session")
def api_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
async def simulators(api_port: int) -> AsyncIterator[Simulators]:
    """Protocol-faithful provider simulators the test service's accounts point at."""
    async with contextlib.AsyncExitStack() as stack:
        fcm = FcmSimulator(project_id="cascade-test")
        await fcm.start()
        stack.push_async_callback(fcm.stop)
        smtp = SmtpSimulator()
        smtp.start()
        stack.callback(smtp.stop)
        yield Simulators(
            twilio=await stack.enter_async_context(TwilioSimulator()),
            whatsapp=await stack.enter_async_context(
                WhatsAppSimulator(
                    webhook_url=f"http://127.0.0.1:{api_port}/v1/providers/whatsapp/status"
                )
            ),
            telegram=await stack.enter_async_context(TelegramSimulator()),
            fcm=fcm,
            smtp=smtp,
            smsc=await stack.enter_async_context(SmscSimulator(system_id="cascade")),
            viber=await stack.enter_async_context(
                # Viber's receipts name no attempt: one before the send's answer is
                # recorded is dropped (`status_for_unknown_attempt`), so they come later.
                ViberSimulator(
                    webhook_url=f"http://127.0.0.1:{api_port}/v1/providers/viber/status",
                    callback_delay_seconds=0.3,
                )
            ),
        )


SANDBOX_SECRET = Settings().sandbox_secret.get_secret_value()
TELEGRAM_WEBHOOK_SECRET = "tg-webhook_secret-0123456789"


def provider_accounts(sims: Simulators, api_port: int) -> list[dict[str, object]]:
    service_account = ServiceAccount.generate(
        project_id="cascade-test", token_uri=sims.fcm.token_uri
    )
    sims.fcm.register(service_account)
    return [
        {
            "type": "twilio",
            "name": "twilio",
            "config": {
                "base_url": sims.twilio.base_url,
                "account_sid": sims.twilio.account_sid,
                "auth_token": sims.twilio.auth_token,
                "from_number": "+15005550006",
            },
        },
        {
            "type": "whatsapp",
            "name": "whatsapp",
            "config": {
                "base_url": sims.whatsapp.base_url,
                "phone_number_id": sims.whatsapp.phone_number_id,
                "access_token": sims.whatsapp.access_token,
                "app_secret": sims.whatsapp.app_secret,
                "verify_token": "verify-me",
            },
            # The receipts' `pricing.category` replaces the per-message estimate.
            "price": {
                "currency": "EUR",
                "per_message": "0.0500",
                "pricing_categories": {"utility": "0.0085", "marketing": "0.0412"},
            },
        },
        {
            "type": "telegram",
            "name": "telegram",
            "config": {
                "base_url": sims.telegram.base_url,
                "bot_token": sims.telegram.bot_token,
                "webhook_secret": TELEGRAM_WEBHOOK_SECRET,
            },
        },
        {
            "type": "fcm",
            "name": "fcm",
            "config": {
                "base_url": sims.fcm.base_url,
                "project_id": "cascade-test",
                "service_account_json": service_account.to_json(),
            },
        },
        {
            "type": "twilio",
            "name": "twilio-fragile",
            "breaker_threshold": 2,
            "breaker_cooldown_seconds": 60,
            "config": {
                "base_url": sims.twilio.base_url,
                "account_sid": sims.twilio.account_sid,
                "auth_token": sims.twilio.auth_token,
                "from_number": "+15005550006",
            },
        },
        {
            # Gives up on Twilio's answer before the simulator's slow numbers give one.
            "type": "twilio",
            "name": "twilio-impatient",
            "config": {
                "base_url": sims.twilio.base_url,
                "account_sid": sims.twilio.account_sid,
                "auth_token": sims.twilio.auth_token,
                "from_number": "+15005550006",
                "timeout_seconds": 0.5,
            },
        },
        {
            "type": "sandbox",
            "name": "sandbox-slow",
            "rate_per_second": 0.5,
            "burst": 1,
            "config": {
                "callback_url": f"http://127.0.0.1:{api_port}/v1/providers/sandbox-slow/status",
                "secret": SANDBOX_SECRET,
                "delay_seconds": 0.05,
            },
        },
        {
            "type": "smpp",
            "name": "smpp",
            "config": {
                "host": sims.smsc.host,
                "port": sims.smsc.port,
                "system_id": sims.smsc.system_id,
                "password": sims.smsc.password,
                "source_addr": "Cascade",
            },
        },
        {
            "type": "viber",
            "name": "viber",
            "config": {
                "base_url": sims.viber.base_url,
                "auth_token": sims.viber.auth_token,
                "sender_name": "Cascade",
            },
        },
        {
            "type": "smtp",
            "name": "smtp",
            "config": {
                "host": sims.smtp.host,
                "port": sims.smtp.port,
                "starttls": False,
                "from_address": "Cascade <noreply@cascade.test>",
                "bounce_domain": "bounces.cascade.test",
                "bounce_secret": "bounce-secret",
            },
        },
    ]


@pytest.fixture(scope="session")
def settings(
    servers: embedded.EmbeddedServers, database_url: str, api_port: int, simulators: Simulators
) -> Settings:
    port = api_port
    return Settings(
        providers=provider_accounts(simulators, api_port),
        database_url=database_url,
        redis_url=servers.redis_url,
        public_url=f"http://127.0.0.1:{port}",
        sandbox_delay=timedelta(milliseconds=50),
        worker_poll_delay=0.02,
        retry_base_delay=0.05,
        # Webhook receivers in the tests listen on 127.0.0.1 over plain http.
        webhooks_allow_loopback_http=True,
        dev_mode=True,
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
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            # Longer than the test clients' 5 s keep-alive: the client drops an idle
            # connection before the server closes it, never as it reuses one (a
            # "Server disconnected without sending a response" on a loaded machine).
            timeout_keep_alive=30,
        )
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


@dataclass
class DevStack:
    """A real `cascade dev` (embedded servers, API, workers) started as a user would."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    port: int
    base_url: str
    key: str
    log_path: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a user's shell has beside it: no CASCADE_* but the data dir."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        return {**env, "CASCADE_DATA_DIR": str(self.data_dir), **extra}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


CASCADE_BIN = str(Path(sys.executable).parent / "cascade")


@pytest.fixture(scope="session")
def dev_stack() -> Iterator[DevStack]:
    with started_dev_stack() as stack:
        yield stack


@contextlib.contextmanager
def started_dev_stack(
    data_dir: Path | None = None,
    port: int | None = None,
    log_name: str = "dev.log",
    **extra_env: str,
) -> Iterator[DevStack]:
    """A `cascade dev` of its own (data dir, port), stopped with SIGTERM on exit. Given a
    data dir (a restart's), it is left in place; `extra_env`: CASCADE_* settings."""
    owns_data = data_dir is None
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="cascade-dev-"))
        data_dir.chmod(0o755)
    port = port or _free_port()
    log_path = data_dir / log_name
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [CASCADE_BIN, "dev", "--port", str(port), "--data-dir", str(data_dir)],
            env={**env, "COLUMNS": "300", **extra_env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    key_file = data_dir / "dev-api-key"
    while True:
        if process.poll() is not None:
            raise AssertionError(f"cascade dev exited: {log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if key_file.exists() and httpx.get(f"{base_url}/readyz").status_code == 200:
                break
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"cascade dev not ready: {log_path.read_text()}")
        time.sleep(0.2)
    try:
        yield DevStack(process, data_dir, port, base_url, key_file.read_text().strip(), log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if owns_data:
            shutil.rmtree(data_dir, ignore_errors=True)
