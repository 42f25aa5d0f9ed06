"""Customer webhooks: endpoints, events, deliveries, dispatch cursors.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE webhook_endpoints (
            id uuid PRIMARY KEY,
            tenant_id uuid NOT NULL REFERENCES tenants(id),
            url text NOT NULL,
            description text NOT NULL DEFAULT '',
            event_types text[],
            categories text[],
            secret text NOT NULL,
            previous_secret text,
            previous_secret_expires_at timestamptz,
            failing_since timestamptz,
            disabled_at timestamptz,
            disabled_reason text,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        )""")
    op.execute("CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id, id)")
    op.execute("""
        CREATE TABLE webhook_events (
            id uuid PRIMARY KEY,
            tenant_id uuid NOT NULL,
            message_id uuid NOT NULL,
            category text NOT NULL,
            ledger_event_id bigint NOT NULL UNIQUE,
            type text NOT NULL,
            payload text NOT NULL,
            created_at timestamptz NOT NULL
        )""")
    op.execute("""
        CREATE TABLE webhook_deliveries (
            id uuid PRIMARY KEY,
            tenant_id uuid NOT NULL,
            endpoint_id uuid NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
            event_id uuid NOT NULL REFERENCES webhook_events(id),
            status text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
            attempts integer NOT NULL DEFAULT 0,
            schedule_start integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz,
            last_attempt_at timestamptz,
            response_status integer,
            response_body text,
            latency_ms integer,
            error text,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            UNIQUE (endpoint_id, event_id)
        )""")
    op.execute("CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, id DESC)")
    op.execute("CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id)")
    # The sweeper's scan for deliveries whose job was lost: only pending rows are indexed.
    op.execute(
        "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)"
        " WHERE status = 'pending'"
    )
    op.execute("""
        CREATE TABLE webhook_cursors (
            message_id uuid PRIMARY KEY,
            seq integer NOT NULL,
            updated_at timestamptz NOT NULL
        )""")
    op.execute("""
        CREATE TABLE webhook_sweep_mark (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            event_id bigint NOT NULL
        )""")
    # Start after the existing history: endpoints only receive events from their creation on.
    op.execute(
        "INSERT INTO webhook_sweep_mark (singleton, event_id)"
        " SELECT true, coalesce(max(id), 0) FROM events"
    )


def downgrade() -> None:
    op.execute("DROP TABLE webhook_sweep_mark")
    op.execute("DROP TABLE webhook_cursors")
    op.execute("DROP TABLE webhook_deliveries")
    op.execute("DROP TABLE webhook_events")
    op.execute("DROP TABLE webhook_endpoints")
