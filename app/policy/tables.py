"""Policy tables (migrations 0004, 0006, 0008): tenant settings, suppressions, the marketing
send log, STOP/START replies, address health and message fingerprints."""

from __future__ import annotations

from sqlalchemy import ARRAY, Column, DateTime, Integer, Table, Text, Time, Uuid
from sqlalchemy.dialects.postgresql import JSONB

from app.ledger.tables import metadata

tenant_settings = Table(
    "tenant_settings",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("timezone", Text, nullable=False),
    Column("locale", Text, nullable=False),
    Column("quiet_hours_start", Time),
    Column("quiet_hours_end", Time),
    Column("frequency_cap", Integer),
    Column("frequency_window_seconds", Integer),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("skip_unreachable_after", Integer),
    Column("skip_unreachable_window_seconds", Integer),
    Column("dedupe_window_seconds", Integer),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("channel", Text, primary_key=True),
    Column("address", Text, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

marketing_sends = Table(
    "marketing_sends",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("address_key", Text, primary_key=True),
    Column("message_id", Uuid, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
)

inbound_replies = Table(
    "inbound_replies",
    metadata,
    Column("provider", Text, primary_key=True),
    Column("event_id", Text, primary_key=True),
    Column("channel", Text, nullable=False),
    Column("address", Text, nullable=False),
    Column("keyword", Text, nullable=False),  # stop | start
    Column("said_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

address_health = Table(
    "address_health",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("channel", Text, primary_key=True),
    Column("address", Text, primary_key=True),
    Column("failed_at", ARRAY(DateTime(timezone=True)), nullable=False),
)

message_fingerprints = Table(
    "message_fingerprints",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("address_key", Text, primary_key=True),
    Column("content_hash", Text, primary_key=True),
    Column("message_id", Uuid, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
)

recipient_preferences = Table(
    "recipient_preferences",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("address_key", Text, primary_key=True),
    Column("opt_out", JSONB, nullable=False),
    Column("preferred_channel", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
