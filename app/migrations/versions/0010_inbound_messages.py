"""Inbound messages: every text a recipient sent back, per tenant, and their webhooks.

- `inbound_messages`: one row per inbound text and tenant it was attributed to (the
  tenants whose messages reached the sender's address on that channel lately; several
  tenants can share a provider account, so one reply can answer several of them), or
  one row with `tenant_id` NULL when it answers none (kept so a replay stays a replay).
  `address` is the sender, normalised like suppressions; `in_reply_to` the tenant's
  latest message to it. `(provider, event_id, tenant_id)` is unique: a provider's
  redelivery of an event finds its rows and is stored and dispatched once.
  `inbound_messages_timeline` serves one recipient's timeline, newest first.
- `webhook_events.inbound_id`: an `inbound.received` webhook event is about an inbound
  message, not a ledger event; exactly one of the two is set. `message_id` and
  `category` are those of the message it replies to.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
# It alters webhook_events: the webhooks branch (0002) must be in first.
depends_on = "0002"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE inbound_messages (
            id uuid PRIMARY KEY,
            tenant_id uuid REFERENCES tenants(id),
            provider text NOT NULL,
            event_id text NOT NULL,
            channel text NOT NULL,
            address text NOT NULL,
            to_address text,
            text text NOT NULL,
            in_reply_to uuid,
            said_at timestamptz NOT NULL,
            received_at timestamptz NOT NULL,
            UNIQUE (provider, event_id, tenant_id)
        )
        """
    )
    op.execute(
        "CREATE INDEX inbound_messages_timeline"
        " ON inbound_messages (tenant_id, address, received_at DESC, id DESC)"
    )
    op.execute(
        """
        ALTER TABLE webhook_events
            ALTER COLUMN ledger_event_id DROP NOT NULL,
            ADD COLUMN inbound_id uuid UNIQUE,
            ADD CONSTRAINT webhook_events_about_one
                CHECK ((ledger_event_id IS NULL) <> (inbound_id IS NULL))
        """
    )


def downgrade() -> None:
    op.execute(
        "DELETE FROM webhook_deliveries WHERE event_id IN"
        " (SELECT id FROM webhook_events WHERE inbound_id IS NOT NULL)"
    )
    op.execute("DELETE FROM webhook_events WHERE inbound_id IS NOT NULL")
    op.execute(
        """
        ALTER TABLE webhook_events
            DROP CONSTRAINT webhook_events_about_one,
            DROP COLUMN inbound_id,
            ALTER COLUMN ledger_event_id SET NOT NULL
        """
    )
    op.execute("DROP TABLE inbound_messages")
