"""Policy and templates: scheduling columns, tenant settings, suppressions, marketing send
log (frequency caps), templates, batch idempotency.

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # send_at: the customer's requested start; expires_at: the message's deadline;
    # not_before: the earliest next send (send_at, or the end of the recipient's quiet hours).
    op.execute("""
        ALTER TABLE messages
            ADD COLUMN send_at timestamptz,
            ADD COLUMN expires_at timestamptz,
            ADD COLUMN not_before timestamptz""")
    # The sweeper's scan for messages past their deadline whose expiry job was lost.
    op.execute(
        "CREATE INDEX messages_expiring ON messages (expires_at)"
        " WHERE expires_at IS NOT NULL AND status IN ('accepted', 'queued', 'sending')"
    )
    op.execute("""
        CREATE TABLE tenant_settings (
            tenant_id uuid PRIMARY KEY REFERENCES tenants(id),
            timezone text NOT NULL DEFAULT 'UTC',
            locale text NOT NULL DEFAULT 'en',
            quiet_hours_start time,
            quiet_hours_end time,
            frequency_cap integer CHECK (frequency_cap > 0),
            frequency_window_seconds integer CHECK (frequency_window_seconds > 0),
            updated_at timestamptz NOT NULL,
            CHECK ((quiet_hours_start IS NULL) = (quiet_hours_end IS NULL)),
            CHECK ((frequency_cap IS NULL) = (frequency_window_seconds IS NULL))
        )""")
    op.execute("""
        CREATE TABLE suppressions (
            tenant_id uuid NOT NULL REFERENCES tenants(id),
            channel text NOT NULL CHECK (channel IN ('push', 'messenger', 'sms', 'email')),
            address text NOT NULL,
            reason text NOT NULL
                CHECK (reason IN ('unsubscribed', 'hard_bounce', 'complaint', 'manual')),
            source text NOT NULL,
            created_at timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, channel, address)
        )""")
    # One row per (marketing message, recipient address) when it is first sent: counts
    # for frequency caps, and tells which tenants an inbound STOP concerns.
    op.execute("""
        CREATE TABLE marketing_sends (
            tenant_id uuid NOT NULL,
            address_key text NOT NULL,
            message_id uuid NOT NULL,
            at timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, address_key, message_id)
        )""")
    op.execute("CREATE INDEX marketing_sends_window ON marketing_sends (tenant_id, address_key, at)")
    op.execute("CREATE INDEX marketing_sends_address ON marketing_sends (address_key, at)")
    op.execute("CREATE INDEX marketing_sends_at ON marketing_sends (at)")
    op.execute("""
        CREATE TABLE templates (
            id uuid PRIMARY KEY,
            tenant_id uuid NOT NULL REFERENCES tenants(id),
            name text NOT NULL,
            locale text NOT NULL,
            description text,
            variants jsonb NOT NULL,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            UNIQUE (tenant_id, name, locale)
        )""")
    op.execute("""
        CREATE TABLE batch_idempotency_keys (
            tenant_id uuid NOT NULL REFERENCES tenants(id),
            key text NOT NULL,
            request_hash bytea NOT NULL,
            status_code integer NOT NULL,
            response jsonb NOT NULL,
            created_at timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, key)
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE batch_idempotency_keys")
    op.execute("DROP TABLE templates")
    op.execute("DROP TABLE marketing_sends")
    op.execute("DROP TABLE suppressions")
    op.execute("DROP TABLE tenant_settings")
    op.execute("DROP INDEX messages_expiring")
    op.execute(
        "ALTER TABLE messages DROP COLUMN send_at, DROP COLUMN expires_at, DROP COLUMN not_before"
    )
