"""The package as a wheel installs and migrates on its own: no checkout beside it (the
Docker image's `cascade migrate`)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from app import embedded
from tests.conftest import _with_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel built from a copy of the sources, installed (non-editable) into a dir."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("app", "providers"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("cascade-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "app/migrations/env.py" in names
    assert "app/migrations/script.py.mako" in names
    assert "app/migrations/versions/0001_ledger.py" in names
    site = work / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300
    )
    yield site


def test_cascade_migrate_from_an_installed_wheel(
    installed: Path, servers: embedded.EmbeddedServers, tmp_path: Path
) -> None:
    assert servers.database_url
    name = f"cascade_wheel_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(servers.database_url, f'CREATE DATABASE "{name}"'))
    url = _with_database(servers.database_url, name)
    try:
        # The installed copy comes first on sys.path; run from a directory with no sources.
        script = (
            "import sys; sys.path.insert(0, sys.argv[1]); sys.argv = ['cascade', 'migrate'];"
            " import app; assert app.__file__.startswith(sys.path[0]), app.__file__;"
            " from app.cli import main; main()"
        )
        migrated = subprocess.run(
            [sys.executable, "-c", script, str(installed)],
            cwd=tmp_path,
            env={"CASCADE_DATABASE_URL": url, "CASCADE_DEV_MODE": "true", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrated.returncode == 0, (migrated.stdout, migrated.stderr)
        assert "migrated" in migrated.stdout
        tables = asyncio.run(_tables(url))
        assert {"messages", "attempts", "events", "alembic_version"} <= tables
    finally:
        asyncio.run(_admin(servers.database_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}
