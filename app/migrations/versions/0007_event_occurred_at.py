"""`events.occurred_at`: when the provider says a status happened (the handset got the
message, the recipient read it), beside `at`, when we recorded it.

On the event, not the attempt: an attempt gets several receipts (sent, delivered, read),
each with its own time, and the event row is the ledger's "what happened when". NULL
where the provider gives no time (Twilio, client receipts) and for our own events.
Adding a nullable column without a default rewrites nothing.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE events ADD COLUMN occurred_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE events DROP COLUMN occurred_at")
