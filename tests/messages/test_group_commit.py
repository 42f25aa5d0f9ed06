"""Group commit: requests that arrive together share one flush (one statement, one
transaction), and each still gets its own answer: a duplicate key or a conflict in a
flush fails no neighbour, and a flush the database drops leaves nothing behind."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from app.errors import Conflict, ProblemError, Unavailable
from app.ids import IdPrefix, from_public
from app.messages.schemas import SendMessageRequest
from app.messages.service import Acceptance
from app.runtime import Runtime, utcnow
from tests.conftest import Service, Tenant
from tests.helpers import message_body, send

SMS = [{"channel": "sms"}]


def _body(text: str) -> dict[str, Any]:
    return message_body(content={"text": text}, cascade=SMS)


async def _flush_together(
    runtime: Runtime, tenant: Tenant, requests: list[tuple[dict[str, Any], str | None]]
) -> list[Acceptance | BaseException]:
    """Hand the writer every request in the same turn of the event loop: they join one
    flush (the first starts it; it runs once all of them have queued)."""
    writer = runtime.accept_writer

    async def accept(body: dict[str, Any], key: str | None) -> Acceptance:
        return await writer.accept(
            tenant.id,
            SendMessageRequest.model_validate(body),
            key,
            runtime.providers,
            runtime.settings,
            utcnow(),
        )

    return await asyncio.gather(*(accept(b, k) for b, k in requests), return_exceptions=True)


async def _ledger(runtime: Runtime, tenant_id: uuid.UUID) -> dict[uuid.UUID, tuple[int, int]]:
    """Per message of the tenant: the transaction that wrote it (xmin), its accepted events."""
    async with runtime.engine.connect() as conn:
        rows = await conn.exec_driver_sql(
            "SELECT m.id, m.xmin::text::bigint, (SELECT count(*) FROM events e"
            " WHERE e.message_id = m.id AND e.status = 'accepted')"
            " FROM messages m WHERE m.tenant_id = $1",
            (tenant_id,),
        )
        return {row[0]: (int(row[1]), int(row[2])) for row in rows}


async def test_a_mixed_flush_gives_each_request_its_own_answer(
    service: Service, tenant: Tenant
) -> None:
    runtime = service.api_runtime
    original = await send(tenant.client, _body("first"), headers={"Idempotency-Key": "k-old"})
    before = await _ledger(runtime, tenant.id)

    outcomes = await _flush_together(
        runtime,
        tenant,
        [
            (_body("plain"), None),
            (_body("new"), "k-new"),
            (_body("new"), "k-new"),  # the same key and body again, in the same flush
            (_body("other"), "k-new"),  # the same key, another body
            (_body("first"), "k-old"),  # replays the earlier message
            (_body("changed"), "k-old"),  # conflicts with it
        ],
    )

    plain, new, new_again, new_conflict, old_replay, old_conflict = outcomes
    assert isinstance(plain, Acceptance) and not plain.replayed
    assert isinstance(new, Acceptance) and not new.replayed
    assert isinstance(new_again, Acceptance) and new_again.replayed
    assert new_again.message == new.message
    assert isinstance(old_replay, Acceptance) and old_replay.replayed
    assert old_replay.message.id == original
    for refused in (new_conflict, old_conflict):
        assert isinstance(refused, Conflict)
        assert refused.problem().status == 409
    # Exactly the two new messages, written by one transaction, each with its event.
    after = await _ledger(runtime, tenant.id)
    created = {m: after[m] for m in after if m not in before}
    assert set(created) == {
        from_public(IdPrefix.MESSAGE, plain.message.id),
        from_public(IdPrefix.MESSAGE, new.message.id),
    }
    assert len({xmin for xmin, _ in created.values()}) == 1
    assert all(accepted == 1 for _, accepted in after.values())


async def test_concurrent_requests_with_one_key_create_one_message(
    service: Service, tenant: Tenant
) -> None:
    body = _body("once")
    answers = await asyncio.gather(
        *(
            tenant.client.post("/v1/messages", json=body, headers={"Idempotency-Key": "k-race"})
            for _ in range(12)
        )
    )

    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 11
    assert len(await _ledger(service.api_runtime, tenant.id)) == 1


async def _terminate_flush(database_url: str) -> None:
    """End the backend running the writer's statement (as a Postgres restart would)."""
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(200):
            ended = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE query LIKE 'WITH claimed AS%' AND state = 'active'"
                " AND wait_event_type = 'Lock'"
            )
            if ended:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the flush never waited on the held key")
    finally:
        await conn.close()


async def test_a_flush_the_database_drops_fails_as_a_whole_and_leaves_nothing(
    service: Service, tenant: Tenant
) -> None:
    runtime = service.api_runtime
    database_url = service.settings.database_url
    assert database_url is not None
    # Another transaction holds a key, so the flush's one statement waits mid-way (its
    # other messages already inserted, uncommitted) until its connection is cut.
    holder = await asyncpg.connect(database_url)
    try:
        holding = holder.transaction()
        await holding.start()
        await holder.execute(
            "INSERT INTO idempotency_keys (tenant_id, key, request_hash, message_id, response,"
            " created_at) VALUES ($1, 'k-held', '\\x00', $2, '{}', now())",
            tenant.id,
            uuid.uuid4(),
        )
        flush = asyncio.create_task(
            _flush_together(
                runtime,
                tenant,
                [(_body("a"), None), (_body("b"), None), (_body("held"), "k-held")],
            )
        )
        await _terminate_flush(database_url)
        outcomes = await asyncio.wait_for(flush, 30)
        await holding.rollback()
    finally:
        await holder.close()

    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    problems = [o.problem() for o in outcomes if isinstance(o, ProblemError)]
    assert {p.status for p in problems} == {503}
    assert len({p.model_dump_json() for p in problems}) == 1  # the same clear answer for all
    assert await _ledger(runtime, tenant.id) == {}
    # The writer goes on: the next request is accepted on a fresh connection.
    await send(tenant.client, _body("after"))


@pytest.mark.parametrize("key", [None, "k-http"])
async def test_the_answer_over_http_is_the_committed_message(
    service: Service, tenant: Tenant, key: str | None
) -> None:
    headers = {"Idempotency-Key": key} if key else {}
    async with httpx.AsyncClient(
        base_url=service.base_url, headers={"Authorization": f"Bearer {tenant.key}"}
    ) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/messages", json=_body(f"m{i}"), headers=headers) for i in range(8))
        )
    accepted = [a for a in answers if a.status_code == 202]
    stored = await _ledger(service.api_runtime, tenant.id)
    assert {from_public(IdPrefix.MESSAGE, a.json()["id"]) for a in accepted} <= set(stored)
    if key is None:
        assert len(accepted) == 8 and len(stored) == 8
    else:
        # One body wins the key; the other bodies are told it was used for another.
        assert len(stored) == 1
        assert {a.status_code for a in answers} <= {202, 409}
