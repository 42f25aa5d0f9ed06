"""The `cascade` command: run the service, manage keys, inspect the spec."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer
import typer.core
import uvloop
from rich.console import Console
from rich.panel import Panel

from app import embedded, migrate
from app.auth.service import ALL_SCOPES, Scope, ensure_tenant, issue_key, key_exists
from app.db import create_engine
from app.logs import configure_logging
from app.ops.commands import create_key_via_api
from app.ops.commands import register as register_api_commands
from app.runtime import Runtime, utcnow
from app.settings import Settings, production_refusal
from app.supervisor import Supervisor

_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH"}
_typer_display_type = typer.core.TyperOption.display_type_rich


def _display_type(param: Any, ctx: Any) -> str | None:
    """Typer 0.2x labels every option `<str>` and every flag `<bool>` in `--help`: show
    click-style metavars instead (TEXT, INTEGER, a|b) and nothing for a flag."""
    if getattr(param, "is_flag", False):
        return None
    label = _typer_display_type(param, ctx)
    if label is None or not (label.startswith("<") and label.endswith(">")):
        return label
    inner = label[1:-1]
    many = inner.startswith("list[")
    inner = inner.removeprefix("list[").removesuffix("]") if many else inner
    shown = _TYPE_NAMES.get(inner, inner if "|" in inner else inner.upper())
    return f"{shown}..." if many else shown


for _param_class in (typer.core.TyperOption, typer.core.TyperArgument):
    setattr(_param_class, "display_type_rich", _display_type)  # noqa: B010

cli = typer.Typer(help="Cascade: message delivery with channel cascades.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
providers_cli = typer.Typer(help="Provider accounts.", no_args_is_help=True)
cli.add_typer(providers_cli, name="providers")
telegram_cli = typer.Typer(help="Telegram bot accounts.", no_args_is_help=True)
providers_cli.add_typer(telegram_cli, name="telegram")
register_api_commands(cli, keys_cli)
console = Console()
log = structlog.get_logger()

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi" / "openapi.json"


def _resolved(
    settings: Settings, command: str, *, port: int | None = None, exclusive: bool = False
) -> tuple[Settings, embedded.EmbeddedServers]:
    """Settings with both URLs: given, a running `cascade dev`'s (attached, never stopped
    by us), or embedded servers started here."""
    try:
        servers = embedded.start_embedded(
            settings.data_dir,
            database_url=settings.database_url,
            redis_url=settings.redis_url,
            command=command,
            port=port,
            exclusive=exclusive,
        )
    except embedded.AlreadyRunning as exc:
        console.print(f"[red]{exc}[/]", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    return (
        settings.model_copy(
            update={"database_url": servers.database_url, "redis_url": servers.redis_url}
        ),
        servers,
    )


async def _ensure_key(settings: Settings, tenant: str, candidate: str | None) -> str:
    """`candidate` if it is a known key, else a new key (adopting `candidate` when given)."""
    engine = create_engine(settings.database_url or "", 1)
    pepper = settings.api_key_pepper.get_secret_value()
    try:
        async with engine.begin() as conn:
            tenant_id = await ensure_tenant(conn, tenant, utcnow())
            if candidate and await key_exists(conn, pepper, candidate):
                return candidate
            issued = await issue_key(conn, pepper, tenant_id, "dev", utcnow(), key=candidate)
    finally:
        await engine.dispose()
    return issued.key


def _dev_key(settings: Settings, given: str | None, key_file: Path) -> str:
    """The dev tenant's key: CASCADE_API_KEY, else the one kept under the data dir."""
    stored = key_file.read_text().strip() if key_file.exists() else None
    key = asyncio.run(_ensure_key(settings, "dev", given or stored))
    if not given and key != stored:
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    return key


def dev_example_curl(base_url: str, key: str) -> str:
    body = (
        '{"category": "transactional", '
        '"to": {"push_token": "device-silent", "phone": "+48600100200"}, '
        '"content": {"text": "Your code is 4711"}, '
        '"cascade": [{"channel": "push", "timeout": 3}, {"channel": "sms"}]}'
    )
    return (
        f"curl -s {base_url}/v1/messages -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{body}'\n"
        f"curl -s {base_url}/v1/messages/<id> -H 'Authorization: Bearer {key}'"
    )


def _refuse_taken_port(host: str, port: int) -> None:
    """Before anything starts: a taken port would fail the API after the workers ran."""
    with socket.socket() as probe:
        # As uvicorn binds: connections left in TIME_WAIT by a stack just stopped are no
        # listener, and must not keep a restart off its port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            console.print(f"[red]cannot listen on {host}:{port}: {exc.strerror}[/]")
            raise typer.Exit(1) from None


def _refuse_dev_defaults(settings: Settings, *, redis: bool = True) -> None:
    """Outside `cascade dev`: a process on dev defaults (embedded servers, built-in secrets)
    would look like it works, and lose data or accept forged keys. Refuse, naming them."""
    if missing := settings.missing_for_production(redis=redis):
        console.print(f"[red]{production_refusal(missing)}[/]", soft_wrap=True, highlight=False)
        raise typer.Exit(1)


def dev_locations(
    environment: Settings, data_dir: Path | None, public_url: str | None, local_url: str
) -> tuple[Path, str]:
    """`cascade dev`'s data dir and public URL: the option, else the environment
    (`CASCADE_DATA_DIR`, `CASCADE_PUBLIC_URL`), else the defaults (`.cascade`, the local
    address it serves on). Options never shadow the environment with defaults of their own."""
    given = environment.model_fields_set
    return (
        data_dir or environment.data_dir,
        public_url or (environment.public_url if "public_url" in given else local_url),
    )


# How long the API gives requests still open at SIGTERM (under the supervisor's bound).
API_GRACEFUL_SECONDS = 5


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@cli.command()
def dev(
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    host: Annotated[str, typer.Option(help="API bind address.")] = "127.0.0.1",
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Embedded servers' data [default: CASCADE_DATA_DIR, else .cascade]."),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="Where providers reach this API, e.g. a tunnel (status callback URLs are"
            " built from it) [default: CASCADE_PUBLIC_URL, else http://<host>:<port>]."
        ),
    ] = None,
) -> None:
    """Everything on one machine: embedded Postgres + Redis, migrations, API, workers, sandbox."""
    from app.worker import PROCESS_SPLIT

    configure_logging()
    local_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    data_dir, public_url = dev_locations(Settings(), data_dir, public_url, local_url)
    settings = Settings(data_dir=data_dir, public_url=public_url, dev_mode=True)
    owner = embedded.running_owner(data_dir)
    if owner is not None and owner.command == embedded.DEV_COMMAND:
        console.print(f"[red]{embedded.AlreadyRunning(data_dir, owner)}[/]", soft_wrap=True)
        raise typer.Exit(1)
    _refuse_taken_port(host, port)
    settings, servers = _resolved(settings, embedded.DEV_COMMAND, port=port, exclusive=True)
    assert settings.database_url and settings.redis_url
    migrate.upgrade(settings.database_url)
    key = _dev_key(settings, os.environ.get("CASCADE_API_KEY"), data_dir / "dev-api-key")
    env = {
        **os.environ,
        "CASCADE_DATABASE_URL": settings.database_url,
        "CASCADE_REDIS_URL": settings.redis_url,
        "CASCADE_PUBLIC_URL": public_url,
        "CASCADE_DATA_DIR": str(data_dir),
        "CASCADE_DEV_MODE": "true",
        # Dev mode: webhook endpoints may be plain http on this machine.
        "CASCADE_WEBHOOKS_ALLOW_LOOPBACK_HTTP": os.environ.get(
            "CASCADE_WEBHOOKS_ALLOW_LOOPBACK_HTTP", "true"
        ),
    }
    api_argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        # Requests still open this long after SIGTERM are cut; then the lifespan flushes
        # the group-commit writers and closes the pools (within the supervisor's bound).
        "--timeout-graceful-shutdown",
        str(API_GRACEFUL_SECONDS),
    ]
    # Split as recommended for production: marketing in a process of its own, at a lower
    # CPU priority, so a campaign does not slow transactional sends down.
    workers = [
        (
            f"worker {q}",
            [sys.executable, "-m", "app.cli", "worker", "--queues", q, "--nice", str(n)],
        )
        for q, n in PROCESS_SPLIT
    ]
    # Tiers, started in this order and stopped in the reverse: the workers post their
    # sandbox receipts to the API, so they stop (and post what they owe) before it does.
    supervisor = Supervisor([[("api", api_argv)], workers], env)
    supervisor.start()
    console.print(
        Panel.fit(
            f"[bold]Cascade dev[/] is running on [cyan]{local_url}[/]\n"
            + (f"Providers reach it at [cyan]{public_url}[/]\n" if public_url != local_url else "")
            + f"\nAPI key:   [green]{key}[/]\n"
            f"Postgres:  {settings.database_url}\nRedis:     {settings.redis_url}\n"
            "Providers: sandbox for push, messenger, sms, email\n"
            "Ctrl-C stops everything.",
            title="cascade",
        )
    )
    # Printed outside the panel so it copies as one working command.
    console.print("Watch a cascade fall over from push (silent device) to SMS:", style="bold")
    console.print(dev_example_curl(local_url, key), soft_wrap=True, highlight=False)
    # `kill`/`timeout` send SIGTERM: stop as cleanly as on Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        # A child that dies is started again (with backoff); the others keep serving.
        while True:
            supervisor.check()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM while stopping cuts the wait short (SIGKILL), and
        # never the stop itself: the servers are stopped whatever the children did.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: supervisor.hurry())
        try:
            supervisor.stop()
        finally:
            servers.stop()
            log.info("embedded_servers_stopped")
            console.print("stopped")


@cli.command()
def api(
    port: Annotated[int, typer.Option()] = 8000,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    workers: Annotated[int, typer.Option(help="API processes.")] = 1,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    _refuse_dev_defaults(Settings())

    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
    )


@cli.command()
def worker(
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve this worker's Prometheus metrics on this port.")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Bind address for --metrics-port (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    queues: Annotated[
        list[str] | None,
        typer.Option(
            help="Queues this process works (repeat or comma-separate): transactional,"
            " service, marketing, webhooks. Default: all.",
        ),
    ] = None,
    nice: Annotated[
        int,
        typer.Option(
            help="Add this to the process' nice value: e.g. 10 for a marketing-only worker,"
            " so bulk sends yield the CPU to transactional ones on the same host.",
        ),
    ] = 0,
) -> None:
    """Run the arq workers: by default every queue (one per category, plus webhooks).

    Recommended: two processes, `--queues transactional,service,webhooks` and
    `--queues marketing --nice 10`. Each process binds its own SMPP sessions.
    """
    from prometheus_client import start_http_server

    from app.worker import parse_queues, serve

    try:
        names = parse_queues(queues or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--queues") from None
    if nice:
        try:
            os.nice(nice)
        except PermissionError:
            raise typer.BadParameter(
                "a negative value (a higher priority) needs privileges", param_hint="--nice"
            ) from None
    _refuse_dev_defaults(Settings())
    configure_logging()
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host)
    settings, servers = _resolved(Settings(), "worker")
    try:
        # uvloop, as uvicorn uses for the API: cheaper socket I/O per job.
        uvloop.run(serve(lambda: Runtime.start(settings), names))
    finally:
        servers.stop()


@cli.command(name="migrate")
def migrate_command() -> None:
    """Apply database migrations."""
    configure_logging(logging.WARNING)
    settings = Settings()
    if settings.database_url:
        migrate.upgrade(settings.database_url)
    else:
        # Embedded: beside a running `cascade dev` or in dev mode, never quietly elsewhere.
        if not settings.dev_mode and embedded.running_owner(settings.data_dir) is None:
            console.print(f"[red]{production_refusal(['CASCADE_DATABASE_URL'])}[/]", soft_wrap=True)
            raise typer.Exit(1)
        settings, servers = _resolved(settings, "migrate")
        try:
            migrate.upgrade(settings.database_url or "")
        finally:
            servers.stop()
    console.print("migrated")


@cli.command()
def openapi(
    check: Annotated[bool, typer.Option(help="Fail if the file differs.")] = False,
) -> None:
    """Write (or check) openapi/openapi.json from the app."""
    from app.main import create_app

    spec = json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True) + "\n"
    if check:
        if not SPEC_PATH.exists() or SPEC_PATH.read_text() != spec:
            console.print("openapi/openapi.json is out of date: run `cascade openapi`")
            raise typer.Exit(1)
        return
    SPEC_PATH.parent.mkdir(exist_ok=True)
    SPEC_PATH.write_text(spec)
    console.print(f"wrote {SPEC_PATH}")


@providers_cli.command("check")
def providers_check() -> None:
    """Validate provider accounts and credential formats, without sending anything."""
    from rich.table import Table

    from app.runtime import provider_accounts
    from providers.accounts import check_account

    settings = Settings()
    try:
        accounts = provider_accounts(settings)
    except ValueError as exc:
        console.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table("name", "type", "routes as", "categories", "result")
    problems = {account.name: check_account(account) for account in accounts}
    for account in accounts:
        table.add_row(
            account.name,
            account.type,
            account.route,
            ", ".join(account.categories) or "all",
            "[red]failed[/]" if problems[account.name] else "[green]ok[/]",
        )
    console.print(table)
    for name, found in problems.items():
        for problem in found:
            console.print(f"{name}: {problem}", soft_wrap=True, highlight=False)
    if any(problems.values()):
        raise typer.Exit(1)


@telegram_cli.command("set-webhook")
def telegram_set_webhook(
    account: Annotated[
        str | None, typer.Option(help="The telegram account's name (default: the only one).")
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="Where Telegram reaches this API (default: CASCADE_PUBLIC_URL): HTTPS, on"
            " port 443, 80, 88 or 8443."
        ),
    ] = None,
    drop_pending_updates: Annotated[
        bool, typer.Option("--drop-pending-updates", help="Discard the updates Telegram holds.")
    ] = False,
) -> None:
    """Send a Telegram bot's updates (replies, STOP) to this API, with its webhook secret."""
    from rich.markup import escape

    from app.runtime import provider_accounts
    from providers.accounts import adapter_config
    from providers.telegram import (
        ALLOWED_UPDATES,
        TelegramApiError,
        TelegramConfig,
        TelegramProvider,
    )

    settings = Settings()
    try:
        bots = [a for a in provider_accounts(settings) if a.type == "telegram"]
        names = ", ".join(a.name for a in bots) or "none"
        chosen = [a for a in bots if account in (None, a.name)]
        if len(chosen) != 1:
            wanted = f"no telegram account {account!r}" if account else "pass --account"
            raise ValueError(f"{wanted} (telegram accounts: {names})")
        config = adapter_config(chosen[0])
    except ValueError as exc:
        console.print(f"[red]configuration error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    assert isinstance(config, TelegramConfig)
    provider = TelegramProvider(config)
    if provider.config.webhook_secret is None:
        console.print(
            f"[red]configuration error:[/] account {provider.name!r} has no webhook_secret"
            ' (1-256 of A-Z a-z 0-9 _ -, e.g. "env:TELEGRAM_WEBHOOK_SECRET")',
            soft_wrap=True,
        )
        raise typer.Exit(1)
    base = (public_url or settings.public_url).rstrip("/")
    url = f"{base}/v1/providers/{provider.name}/inbound"

    async def set_webhook() -> str:
        try:
            return await provider.set_webhook(url, drop_pending_updates=drop_pending_updates)
        finally:
            await provider.aclose()

    try:
        described = asyncio.run(set_webhook())
    except TelegramApiError as exc:
        console.print(f"[red]Telegram refused:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{escape(described)}: {url}", soft_wrap=True, highlight=False)
    console.print(f"updates: {', '.join(ALLOWED_UPDATES)}", highlight=False)


@keys_cli.command("create")
def keys_create(
    tenant: Annotated[
        str | None,
        typer.Option(
            help="Tenant name (created if new), straight in the database; without it the key"
            " is made through the API for the admin key's tenant."
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
    scopes: Annotated[str, typer.Option(help="Comma-separated: send,read,admin.")] = "send,read",
    url: Annotated[str | None, typer.Option(envvar="CASCADE_URL", help="API base URL.")] = None,
    key: Annotated[str | None, typer.Option(envvar="CASCADE_API_KEY", help="Admin key.")] = None,
) -> None:
    """Create an API key; it is shown once."""
    if tenant is None:
        create_key_via_api(name, scopes, url, key)
        return
    # Only the key on stdout (`KEY=$(cascade keys create …)`); warnings go to stderr.
    configure_logging(logging.WARNING)
    settings, servers = _resolved(Settings(), "keys create")
    wanted = frozenset(Scope(s.strip()) for s in scopes.split(",") if s.strip()) or ALL_SCOPES

    async def create() -> str:
        engine = create_engine(settings.database_url or "", 1)
        try:
            async with engine.begin() as conn:
                tenant_id = await ensure_tenant(conn, tenant, utcnow())
                issued = await issue_key(
                    conn,
                    settings.api_key_pepper.get_secret_value(),
                    tenant_id,
                    name,
                    utcnow(),
                    wanted,
                )
        finally:
            await engine.dispose()
        return issued.key

    try:
        console.print(asyncio.run(create()))
    finally:
        servers.stop()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
