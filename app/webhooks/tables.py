"""The webhook tables as SQLAlchemy Core (migration 0002 is the source of truth)."""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    Table,
    Text,
    Uuid,
)

from app.ledger.tables import metadata

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, ForeignKey("tenants.id"), nullable=False),
    Column("url", Text, nullable=False),
    Column("description", Text, nullable=False),
    # NULL means every event type / every category.
    Column("event_types", ARRAY(Text)),
    Column("categories", ARRAY(Text)),
    Column("secret", Text, nullable=False),
    Column("previous_secret", Text),
    Column("previous_secret_expires_at", DateTime(timezone=True)),
    Column("failing_since", DateTime(timezone=True)),
    Column("disabled_at", DateTime(timezone=True)),
    Column("disabled_reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# One row per ledger event (or inbound message) that matched at least one endpoint: the
# exact bytes every delivery of it sends, so retries and replays are byte-identical.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("message_id", Uuid, nullable=False),
    Column("category", Text, nullable=False),
    # Exactly one of these (migration 0010): a ledger event, or an inbound message.
    Column("ledger_event_id", BigInteger, unique=True),
    Column("inbound_id", Uuid, unique=True),
    Column("type", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("endpoint_id", Uuid, ForeignKey("webhook_endpoints.id"), nullable=False),
    Column("event_id", Uuid, ForeignKey("webhook_events.id"), nullable=False),
    Column("status", Text, nullable=False),
    # Attempts ever made; `schedule_start` is where the current retry schedule began
    # (a replay starts a new schedule without reusing attempt numbers in job ids).
    Column("attempts", Integer, nullable=False),
    Column("schedule_start", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("response_status", Integer),
    Column("response_body", Text),
    Column("latency_ms", Integer),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# How far each message's events have been turned into deliveries.
webhook_cursors = Table(
    "webhook_cursors",
    metadata,
    Column("message_id", Uuid, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# The sweeper's high-water mark over the ledger's `events.id` (one row).
webhook_sweep_mark = Table(
    "webhook_sweep_mark",
    metadata,
    Column("singleton", Boolean, primary_key=True),
    Column("event_id", BigInteger, nullable=False),
)
