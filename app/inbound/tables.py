"""The inbound table as SQLAlchemy Core (migration 0010 is the source of truth)."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Table, Text, Uuid

from app.ledger.tables import metadata

# One row per inbound text and tenant it answers (tenant_id NULL: it answers no one's).
inbound_messages = Table(
    "inbound_messages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid),
    Column("provider", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("address", Text, nullable=False),  # the sender, normalised
    Column("to_address", Text),
    Column("text", Text, nullable=False),
    Column("in_reply_to", Uuid),
    Column("said_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)
