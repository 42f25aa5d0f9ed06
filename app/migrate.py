"""Apply the Alembic migrations (sync: call it off the event loop).

The migrations ship inside the package (`app/migrations`), so `cascade migrate` works from
an installed wheel as from a checkout; no `alembic.ini` is needed.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config


def script_location() -> Path:
    return Path(str(files("app") / "migrations"))


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "heads") -> None:
    command.upgrade(alembic_config(database_url), revision)
