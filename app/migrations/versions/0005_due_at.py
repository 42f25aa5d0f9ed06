"""Timers in Postgres: `messages.due_at`, the next moment the delivery engine must look at a
message (its send time, its current step's deadline, a retry, its expiry); NULL once final.

The engine claims due messages of one category in batches from this index
(`WHERE category = … AND due_at <= now() ORDER BY due_at … FOR UPDATE SKIP LOCKED`):
a million pending steps cost an index, not a million deferred jobs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE messages ADD COLUMN due_at timestamptz")
    op.execute(
        "CREATE INDEX messages_due ON messages (category, due_at) WHERE due_at IS NOT NULL"
    )
    # Unfinished messages of a running deployment: look at each one now (an open step past
    # its deadline expires, a pending one is sent, one still in its window is re-timed).
    op.execute(
        "UPDATE messages SET due_at = now()"
        " WHERE status IN ('accepted', 'queued', 'sending')"
    )
    # Were the sweeper's scans: the engine's index replaces them.
    op.execute("DROP INDEX IF EXISTS messages_unfinished")
    op.execute("DROP INDEX IF EXISTS messages_expiring")
    op.execute("DROP INDEX IF EXISTS attempts_open_deadline")


def downgrade() -> None:
    op.execute(
        "CREATE INDEX attempts_open_deadline ON attempts (deadline_at)"
        " WHERE status IN ('pending', 'sending', 'sent')"
    )
    op.execute(
        "CREATE INDEX messages_expiring ON messages (expires_at)"
        " WHERE expires_at IS NOT NULL AND status IN ('accepted', 'queued', 'sending')"
    )
    op.execute(
        "CREATE INDEX messages_unfinished ON messages (updated_at)"
        " WHERE status IN ('accepted', 'queued', 'sending')"
    )
    op.execute("DROP INDEX messages_due")
    op.execute("ALTER TABLE messages DROP COLUMN due_at")
