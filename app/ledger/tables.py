"""The ledger schema as SQLAlchemy Core tables (the migrations are the source of truth)."""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, ForeignKey("tenants.id"), nullable=False),
    Column("name", Text, nullable=False),
    Column("key_hash", LargeBinary, nullable=False, unique=True),
    Column("key_prefix", Text, nullable=False),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)

# LIST-partitioned by category: primary key (id, category).
messages = Table(
    "messages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("category", Text, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("status", Text, nullable=False),
    Column("recipient", JSONB, nullable=False),
    Column("content", JSONB, nullable=False),
    Column("cascade", JSONB, nullable=False),
    Column("metadata", JSONB, nullable=False),
    Column("current_step", Integer, nullable=False),
    Column("delivered_step", Integer),
    Column("delivered_channel", Text),
    Column("seq", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    # Scheduling (migration 0004): requested start, deadline, and the earliest next send.
    Column("send_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("not_before", DateTime(timezone=True)),
    # The next moment the delivery engine must look at it (migration 0005); NULL once final.
    Column("due_at", DateTime(timezone=True)),
    # Migration 0009: the sum of its attempts' costs; what its last step would have cost.
    Column("cost", Numeric),
    Column("fallback_cost", Numeric),
    Column("unpriced", Boolean, nullable=False),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("message_id", Uuid, nullable=False),
    Column("category", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("channel", Text, nullable=False),
    Column("provider", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("provider_message_id", Text),
    Column("error_code", Text),
    Column("error_detail", Text),
    Column("tries", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    Column("deadline_at", DateTime(timezone=True), nullable=False),
    Column("address", Text),  # normalised; migration 0008
    Column("segments", Integer),
    Column("cost", Numeric),  # migration 0009
    Column("currency", Text),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("message_id", Uuid, nullable=False),
    Column("category", Text, nullable=False),
    Column("tenant_id", Uuid, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("attempt_id", Uuid),
    Column("step", Integer),
    Column("status", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("detail", JSONB),
    Column("dedupe_key", Text, unique=True),
    Column("at", DateTime(timezone=True), nullable=False),
    # When the provider says it happened (`at`: when we recorded it); NULL when it says not.
    Column("occurred_at", DateTime(timezone=True)),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("request_hash", LargeBinary, nullable=False),
    Column("message_id", Uuid, nullable=False),
    Column("response", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
