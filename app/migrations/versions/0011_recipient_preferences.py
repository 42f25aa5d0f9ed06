"""Recipient preferences: the channels a person opted out of, per category, and the
channel they prefer first.

Keyed by tenant and address key (`phone:+48…`, `email:ann@…`, `id:<push token or chat
id>`): a message's recipient matches every key of the addresses it carries.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE recipient_preferences (
            tenant_id uuid NOT NULL,
            address_key text NOT NULL,
            opt_out jsonb NOT NULL,
            preferred_channel text,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, address_key)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE recipient_preferences")
