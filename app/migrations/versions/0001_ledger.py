"""Ledger: tenants, api keys, messages (partitioned by category), attempts, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

CATEGORIES = ("transactional", "service", "marketing")


def upgrade() -> None:
    op.execute("""
        CREATE TABLE tenants (
            id uuid PRIMARY KEY,
            name text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute("""
        CREATE TABLE api_keys (
            id uuid PRIMARY KEY,
            tenant_id uuid NOT NULL REFERENCES tenants(id),
            name text NOT NULL,
            key_hash bytea NOT NULL UNIQUE,
            key_prefix text NOT NULL,
            scopes text[] NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        )""")
    op.execute("""
        CREATE TABLE messages (
            id uuid NOT NULL,
            category text NOT NULL CHECK (category IN ('transactional', 'service', 'marketing')),
            tenant_id uuid NOT NULL REFERENCES tenants(id),
            status text NOT NULL,
            recipient jsonb NOT NULL,
            content jsonb NOT NULL,
            "cascade" jsonb NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}',
            current_step integer NOT NULL DEFAULT 0,
            delivered_step integer,
            delivered_channel text,
            seq integer NOT NULL DEFAULT 1,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            completed_at timestamptz,
            PRIMARY KEY (id, category)
        ) PARTITION BY LIST (category)""")
    for category in CATEGORIES:
        op.execute(
            f"CREATE TABLE messages_{category} PARTITION OF messages FOR VALUES IN ('{category}')"
        )
    op.execute("CREATE INDEX messages_tenant_created ON messages (tenant_id, created_at DESC, id)")
    # The sweeper's scan: only non-final messages are indexed.
    op.execute(
        "CREATE INDEX messages_unfinished ON messages (updated_at)"
        " WHERE status IN ('accepted', 'queued', 'sending')"
    )
    op.execute("""
        CREATE TABLE attempts (
            id uuid PRIMARY KEY,
            message_id uuid NOT NULL,
            category text NOT NULL,
            step integer NOT NULL,
            channel text NOT NULL,
            provider text NOT NULL,
            status text NOT NULL,
            provider_message_id text,
            error_code text,
            error_detail text,
            tries integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            sent_at timestamptz,
            completed_at timestamptz,
            deadline_at timestamptz NOT NULL,
            UNIQUE (message_id, step),
            FOREIGN KEY (message_id, category) REFERENCES messages (id, category)
        )""")
    op.execute(
        "CREATE INDEX attempts_provider_message ON attempts (provider, provider_message_id)"
        " WHERE provider_message_id IS NOT NULL"
    )
    op.execute(
        "CREATE INDEX attempts_open_deadline ON attempts (deadline_at)"
        " WHERE status IN ('pending', 'sending', 'sent')"
    )
    op.execute("""
        CREATE TABLE events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            message_id uuid NOT NULL,
            category text NOT NULL,
            tenant_id uuid NOT NULL,
            seq integer NOT NULL,
            attempt_id uuid,
            step integer,
            status text NOT NULL,
            source text NOT NULL CHECK (source IN ('api', 'worker', 'provider', 'timeout')),
            detail jsonb,
            dedupe_key text UNIQUE,
            at timestamptz NOT NULL,
            UNIQUE (message_id, seq),
            FOREIGN KEY (message_id, category) REFERENCES messages (id, category)
        )""")
    # Append-only: the ledger's history cannot be rewritten through SQL either.
    op.execute("""
        CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'events are append-only';
        END $$""")
    op.execute(
        "CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events"
        " FOR EACH ROW EXECUTE FUNCTION events_append_only()"
    )
    op.execute("""
        CREATE TABLE idempotency_keys (
            tenant_id uuid NOT NULL REFERENCES tenants(id),
            key text NOT NULL,
            request_hash bytea NOT NULL,
            message_id uuid NOT NULL,
            response jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, key)
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE idempotency_keys")
    op.execute("DROP TABLE events")
    op.execute("DROP FUNCTION events_append_only")
    op.execute("DROP TABLE attempts")
    op.execute("DROP TABLE messages")
    op.execute("DROP TABLE api_keys")
    op.execute("DROP TABLE tenants")
