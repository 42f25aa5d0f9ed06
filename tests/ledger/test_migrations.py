"""Migrations upgrade and downgrade on a real Postgres, one revision at a time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from alembic import command

from app import embedded, migrate
from tests.conftest import _with_database


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _column_type(url: str, table: str, column: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetchval(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
            table,
            column,
        )
    finally:
        await conn.close()
    return None if found is None else str(found)


@pytest.fixture
def empty_database(servers: embedded.EmbeddedServers) -> Iterator[str]:
    assert servers.database_url
    name = f"cascade_migrations_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(servers.database_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(servers.database_url, name)
    finally:
        asyncio.run(_admin(servers.database_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


def test_0007_adds_events_occurred_at_and_its_downgrade_drops_it(empty_database: str) -> None:
    config = migrate.alembic_config(empty_database)

    migrate.upgrade(empty_database, "0006")
    assert asyncio.run(_column_type(empty_database, "events", "occurred_at")) is None

    migrate.upgrade(empty_database, "0007")
    assert asyncio.run(_column_type(empty_database, "events", "occurred_at")) == (
        "timestamp with time zone"
    )

    command.downgrade(config, "0006")
    assert asyncio.run(_column_type(empty_database, "events", "occurred_at")) is None
    assert asyncio.run(_column_type(empty_database, "events", "at")) is not None

    migrate.upgrade(empty_database)  # and up again, to head
    assert asyncio.run(_column_type(empty_database, "events", "occurred_at")) is not None


def test_0008_adds_address_health_and_its_downgrade_drops_it(empty_database: str) -> None:
    config = migrate.alembic_config(empty_database)

    migrate.upgrade(empty_database, "0008")
    assert asyncio.run(_column_type(empty_database, "attempts", "address")) == "text"
    assert asyncio.run(_column_type(empty_database, "attempts", "segments")) == "integer"
    assert asyncio.run(_column_type(empty_database, "address_health", "failed_at")) == "ARRAY"
    assert asyncio.run(
        _column_type(empty_database, "tenant_settings", "dedupe_window_seconds")
    ) == ("integer")

    command.downgrade(config, "0007")
    assert asyncio.run(_column_type(empty_database, "attempts", "address")) is None
    assert asyncio.run(_column_type(empty_database, "address_health", "failed_at")) is None
    assert asyncio.run(_column_type(empty_database, "message_fingerprints", "at")) is None
    assert asyncio.run(_column_type(empty_database, "events", "occurred_at")) is not None


def test_0009_adds_costs_and_its_downgrade_drops_them(empty_database: str) -> None:
    config = migrate.alembic_config(empty_database)

    migrate.upgrade(empty_database, "0009")  # brings 0003 (the rollups) along
    assert asyncio.run(_column_type(empty_database, "attempts", "cost")) == "numeric"
    assert asyncio.run(_column_type(empty_database, "attempts", "currency")) == "text"
    assert asyncio.run(_column_type(empty_database, "messages", "cost")) == "numeric"
    assert asyncio.run(_column_type(empty_database, "messages", "unpriced")) == "boolean"
    assert asyncio.run(_column_type(empty_database, "stats_rollups", "priced")) == "bigint"
    assert asyncio.run(_column_type(empty_database, "stats_rollups", "fallback_cost")) == (
        "numeric"
    )

    command.downgrade(config, "0008")
    for table, column in (
        ("attempts", "cost"),
        ("attempts", "currency"),
        ("messages", "fallback_cost"),
        ("stats_rollups", "priced"),
    ):
        assert asyncio.run(_column_type(empty_database, table, column)) is None
    assert asyncio.run(_column_type(empty_database, "stats_rollups", "cost")) == "numeric"
    assert asyncio.run(_column_type(empty_database, "attempts", "segments")) == "integer"

    migrate.upgrade(empty_database)
    assert asyncio.run(_column_type(empty_database, "attempts", "cost")) == "numeric"


def test_0010_adds_inbound_messages_and_its_downgrade_drops_them(empty_database: str) -> None:
    config = migrate.alembic_config(empty_database)

    migrate.upgrade(empty_database)
    assert asyncio.run(_column_type(empty_database, "inbound_messages", "address")) == "text"
    assert asyncio.run(_column_type(empty_database, "webhook_events", "inbound_id")) == "uuid"

    command.downgrade(config, "0010-1")
    assert asyncio.run(_column_type(empty_database, "inbound_messages", "address")) is None
    assert asyncio.run(_column_type(empty_database, "webhook_events", "inbound_id")) is None
    assert asyncio.run(_column_type(empty_database, "webhook_events", "ledger_event_id")) == (
        "bigint"
    )

    migrate.upgrade(empty_database)  # and up again, to head
    assert asyncio.run(_column_type(empty_database, "inbound_messages", "text")) == "text"
