"""Skipping known-dead addresses and suppressing duplicates across channels.

- `attempts.address`: the (normalised) address the attempt was sent to, so what a
  receipt says about it can be kept per address; `attempts.segments`: how many SMS the
  text went as, where the adapter knows (concatenated parts).
- `address_health`: per tenant, channel and address, the times of its latest failures
  (up to 10, newest last) since its last success; a success deletes the row. A step whose
  address has failed its tenant's `skip_unreachable.after_failures` times within
  `window_seconds` is skipped without a send.
- `message_fingerprints`: per tenant, address and content hash, the messages sent, for
  `dedupe_window`: an identical message to a shared address inside the window is not
  sent again. Rows older than any window are pruned.
- `tenant_settings`: the two policies (NULL: off).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE attempts ADD COLUMN address text, ADD COLUMN segments integer")
    op.execute(
        """
        ALTER TABLE tenant_settings
            ADD COLUMN skip_unreachable_after integer,
            ADD COLUMN skip_unreachable_window_seconds integer,
            ADD COLUMN dedupe_window_seconds integer
        """
    )
    op.execute(
        """
        CREATE TABLE address_health (
            tenant_id uuid NOT NULL,
            channel text NOT NULL,
            address text NOT NULL,
            failed_at timestamptz[] NOT NULL,
            PRIMARY KEY (tenant_id, channel, address)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE message_fingerprints (
            tenant_id uuid NOT NULL,
            address_key text NOT NULL,
            content_hash text NOT NULL,
            message_id uuid NOT NULL,
            at timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, address_key, content_hash, message_id)
        )
        """
    )
    op.execute("CREATE INDEX message_fingerprints_at ON message_fingerprints (at)")


def downgrade() -> None:
    op.execute("DROP TABLE message_fingerprints")
    op.execute("DROP TABLE address_health")
    op.execute(
        """
        ALTER TABLE tenant_settings
            DROP COLUMN skip_unreachable_after,
            DROP COLUMN skip_unreachable_window_seconds,
            DROP COLUMN dedupe_window_seconds
        """
    )
    op.execute("ALTER TABLE attempts DROP COLUMN address, DROP COLUMN segments")
