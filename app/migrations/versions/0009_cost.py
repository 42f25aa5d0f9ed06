"""Cost: what each attempt cost, per message, and what the cascade saved.

- `attempts.cost`, `attempts.currency`: priced from the account's `price` table when the
  provider accepted the send (a rejected send costs nothing), replaced by the price a
  receipt reports (WhatsApp `pricing`). NULL: the account has no price that applies.
- `messages.cost`: the sum of its attempts' known costs (NULL: none known), kept in the
  statement that records each; `messages.fallback_cost`: what sending it on its cascade's
  last step would have cost, priced at its first send; `messages.unpriced`: an attempt
  was accepted on an account with no price for it, so its total is unknown.
- `stats_rollups.priced`: how many of the row's messages have a known cost (`cost` sums
  theirs; a message never sent costs 0); `fallback_cost`: the sum of their fallback costs (delivered rows), so
  `fallback_cost - cost` is what the cascade saved. One currency per deployment (the
  accounts' prices must agree), so the rollups carry none.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
# The rollups it alters are another branch's (0003).
depends_on = ("0003",)


def upgrade() -> None:
    op.execute("ALTER TABLE attempts ADD COLUMN cost numeric, ADD COLUMN currency text")
    op.execute(
        "ALTER TABLE messages ADD COLUMN cost numeric, ADD COLUMN fallback_cost numeric,"
        " ADD COLUMN unpriced boolean NOT NULL DEFAULT false"
    )
    op.execute(
        "ALTER TABLE stats_rollups ADD COLUMN priced bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN fallback_cost numeric"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE stats_rollups DROP COLUMN priced, DROP COLUMN fallback_cost")
    op.execute(
        "ALTER TABLE messages DROP COLUMN cost, DROP COLUMN fallback_cost, DROP COLUMN unpriced"
    )
    op.execute("ALTER TABLE attempts DROP COLUMN cost, DROP COLUMN currency")
