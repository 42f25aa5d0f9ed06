"""The exceptions a lost Postgres or Redis really raises (seen in the chaos runs) map to
503; a bug in our SQL or a Redis script error stays a 500."""

from __future__ import annotations

import pytest
from asyncpg.exceptions import (
    CannotConnectNowError,
    ConnectionDoesNotExistError,
    InternalClientError,
    UniqueViolationError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, IntegrityError, InternalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.errors import is_unavailable


def _wrapped(cls: type[DBAPIError], orig: BaseException) -> DBAPIError:
    """As SQLAlchemy's asyncpg dialect raises it: the driver error as `orig` and cause."""
    error = cls("SELECT 1", {}, orig)
    error.__cause__ = orig
    return error


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(2, "No such file or directory"),  # the unix socket is gone
        ConnectionRefusedError(111, "Connection refused"),
        CannotConnectNowError("the database system is shutting down"),
        _wrapped(DBAPIError, CannotConnectNowError("the database system is starting up")),
        _wrapped(DBAPIError, ConnectionDoesNotExistError("connection was closed")),
        _wrapped(InternalError, InternalClientError("cannot switch to state 12")),
        PoolTimeoutError("QueuePool limit of size 10 overflow 10 reached"),
        RedisConnectionError("Error 111 connecting"),
        RedisTimeoutError("Timeout reading from socket"),
    ],
    ids=repr,
)
def test_a_lost_backing_service_is_unavailable(error: BaseException) -> None:
    assert is_unavailable(error)


@pytest.mark.parametrize(
    "error",
    [
        _wrapped(IntegrityError, UniqueViolationError("duplicate key")),
        ResponseError("ERR Error running script"),
        ValueError("a bug"),
    ],
    ids=repr,
)
def test_a_bug_is_not_mistaken_for_an_outage(error: BaseException) -> None:
    assert not is_unavailable(error)


async def test_a_connection_asyncpg_lost_track_of_is_never_reused(database_url: str) -> None:
    """asyncpg's `InternalClientError` (a session Postgres ended mid-transaction) leaves the
    connection's protocol state unknown: the engine invalidates it instead of pooling it."""
    import asyncpg

    from app.db import create_engine

    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert isinstance(raw, asyncpg.Connection)
            pid_before = raw.get_server_pid()

            def confused(_: str) -> str:
                raise InternalClientError("cannot switch to state 12; another operation (2)")

            await raw.set_type_codec(
                "int4", schema="pg_catalog", encoder=str, decoder=confused, format="text"
            )
            with pytest.raises(InternalError):
                await conn.exec_driver_sql("SELECT 1::int4")
            assert conn.invalidated
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None and raw.get_server_pid() != pid_before
            assert (await conn.exec_driver_sql("SELECT 2::int4")).scalar_one() == 2
    finally:
        await engine.dispose()
