"""Template tables (migration 0004)."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Table, Text, Uuid
from sqlalchemy.dialects.postgresql import JSONB

from app.ledger.tables import metadata

templates = Table(
    "templates",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("name", Text, nullable=False),
    Column("locale", Text, nullable=False),
    Column("description", Text),
    Column("variants", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
