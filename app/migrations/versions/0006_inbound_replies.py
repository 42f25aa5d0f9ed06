"""STOP/START replies, kept: each applies once, in the order its recipient sent it.

`inbound_replies` holds every STOP or START a provider forwarded, keyed by the provider
account and its event id (a replay, even freshly signed, finds its row and changes
nothing), with the time the provider says it was sent (else when it arrived). A reply
older than the latest one recorded for its address is recorded but not applied.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE inbound_replies (
            provider text NOT NULL,
            event_id text NOT NULL,
            channel text NOT NULL,
            address text NOT NULL,
            keyword text NOT NULL CHECK (keyword IN ('stop', 'start')),
            said_at timestamptz NOT NULL,
            received_at timestamptz NOT NULL,
            PRIMARY KEY (provider, event_id)
        )
        """
    )
    op.execute("CREATE INDEX inbound_replies_address ON inbound_replies (channel, address, said_at)")


def downgrade() -> None:
    op.execute("DROP TABLE inbound_replies")
