"""The stats rollup table (migration 0003 is the source of truth)."""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Column,
    DateTime,
    Integer,
    Numeric,
    SmallInteger,
    Table,
    Text,
    Uuid,
)

from app.ledger.tables import metadata

stats_rollups = Table(
    "stats_rollups",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("resolution", Text, primary_key=True),
    Column("bucket", DateTime(timezone=True), primary_key=True),
    Column("category", Text, primary_key=True),
    Column("channel", Text, primary_key=True),
    Column("status", Text, primary_key=True),
    Column("step", SmallInteger, primary_key=True),
    Column("shard", SmallInteger, primary_key=True),
    Column("messages", BigInteger, nullable=False),
    Column("latency_ms_sum", BigInteger, nullable=False),
    Column("latency_hist", ARRAY(Integer), nullable=False),
    Column("cost", Numeric),
    Column("priced", BigInteger, nullable=False),  # migration 0009
    Column("fallback_cost", Numeric),
)
