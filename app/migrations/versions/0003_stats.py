"""Ops: message search indexes, the tenant event feed index, stats rollups.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The searchable facts of a message as one jsonb document, stored beside it: recipient
    # addresses in their normal form (E.164 phones, lower-case emails, tokens and ids as
    # given), the cascade's providers and the metadata. Computed once per insert (status
    # updates do not touch its inputs); plpgsql because a SQL function here is not inlined
    # and costs 4x more per row. GIN jsonb_path_ops stores 4-byte hashes of the values,
    # whatever their length, and `@>` rechecks the stored document.
    op.execute("""
        CREATE FUNCTION message_search_doc(recipient jsonb, steps jsonb, metadata jsonb)
        RETURNS jsonb
        LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
        AS $$
        BEGIN
            RETURN jsonb_build_object(
                'to', jsonb_build_array(
                    recipient->>'phone',
                    recipient->>'whatsapp',
                    lower(recipient->>'email'),
                    recipient->>'push_token',
                    recipient->>'telegram_chat_id',
                    recipient->>'viber_id',
                    recipient->'web_push'->>'endpoint'
                ),
                'provider', jsonb_path_query_array(steps, '$[*].provider'),
                'metadata', metadata
            );
        END $$""")
    op.execute("""
        ALTER TABLE messages ADD COLUMN search_doc jsonb
        GENERATED ALWAYS AS (message_search_doc(recipient, "cascade", metadata)) STORED""")
    op.execute("CREATE INDEX messages_search ON messages USING gin (search_doc jsonb_path_ops)")
    # "What failed for this tenant lately?" without walking every delivered message.
    op.execute(
        "CREATE INDEX messages_tenant_status_created"
        " ON messages (tenant_id, status, created_at DESC, id DESC)"
    )
    # The tenant's live event feed (`GET /v1/events`, `cascade tail`).
    op.execute("CREATE INDEX events_tenant_id ON events (tenant_id, id)")

    # One row per (tenant, resolution, bucket, dimensions, shard), bumped by one upsert when
    # a message reaches its final status; `shard` spreads concurrent upserts over rows.
    op.execute("""
        CREATE TABLE stats_rollups (
            tenant_id uuid NOT NULL,
            resolution text NOT NULL CHECK (resolution IN ('minute', 'hour', 'day')),
            bucket timestamptz NOT NULL,
            category text NOT NULL,
            channel text NOT NULL,
            status text NOT NULL,
            step smallint NOT NULL,
            shard smallint NOT NULL,
            messages bigint NOT NULL,
            latency_ms_sum bigint NOT NULL,
            latency_hist integer[] NOT NULL,
            cost numeric,
            PRIMARY KEY (tenant_id, resolution, bucket, category, channel, status, step, shard)
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE stats_rollups")
    op.execute("DROP INDEX events_tenant_id")
    op.execute("DROP INDEX messages_tenant_status_created")
    op.execute("DROP INDEX messages_search")
    op.execute("ALTER TABLE messages DROP COLUMN search_doc")
    op.execute("DROP FUNCTION message_search_doc")
