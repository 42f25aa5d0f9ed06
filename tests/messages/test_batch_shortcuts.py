"""The batch's shortcuts give what the one-message path gives: rows reused for the items
that follow the batch, a COPY inside the request's transaction, every job in one script
call that arq reads as its own."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
from arq.jobs import Job as ArqJob
from arq.jobs import JobStatus, deserialize_job
from arq.utils import timestamp_ms, to_unix_ms
from sqlalchemy import func, select

from app import queue as queue_module
from app.db import Transaction
from app.errors import InvalidRequest
from app.ledger.tables import events, messages
from app.messages.batch import _SharedRow, insert_accepted_messages, merged_request
from app.messages.schemas import BatchMessageIn, SendBatchRequest, SendMessageRequest
from app.messages.service import prepare_message
from app.queue import Job
from app.runtime import utcnow
from app.templates.service import TemplateLookup
from providers.base import Category
from tests.conftest import Service, Tenant


def batch_request(**defaults: Any) -> SendBatchRequest:
    return SendBatchRequest.model_validate(
        {
            "category": "transactional",
            "cascade": [
                {"channel": "push"},
                {"channel": "sms", "timeout": 600},
                {"channel": "email", "success_on": "delivered"},
            ],
            "content": {"text": "Your code is 4711", "subject": "Login code"},
            "metadata": {"campaign": "spring"},
            **defaults,
            "messages": [
                {"to": {"push_token": "t-1", "phone": "+48600100201", "email": "a@example.com"}},
                {
                    "to": {
                        "push_token": "t-2",
                        "phone": "+48600100202",
                        "email": "B@Example.com",
                        "timezone": "Europe/Warsaw",
                    },
                    "metadata": {"customer": "c-2"},
                },
                {"to": {"push_token": "t-3", "phone": "+48600100203", "email": "c@example.com"}},
                {"to": {"phone": "+48600100204", "email": "d@example.com"}},  # no push token
            ],
        }
    )


async def full_path_rows(
    service: Service, tenant: Tenant, batch: SendBatchRequest
) -> list[dict[str, Any] | None]:
    runtime = service.api_runtime
    at = utcnow()
    rows: list[dict[str, Any] | None] = []
    async with runtime.engine.connect() as conn:
        lookup = TemplateLookup(conn, tenant.id, runtime.settings)
        for item in batch.messages:
            assert isinstance(item, BatchMessageIn)
            request = SendMessageRequest.model_validate(merged_request(batch, item))
            try:
                rows.append(
                    await prepare_message(
                        tenant.id, request, runtime.providers, runtime.settings, lookup, at
                    )
                )
            except InvalidRequest:
                rows.append(None)
    return rows


def without_id(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: v for k, v in row.items() if k != "id"}


@pytest.mark.parametrize("scheduled", [False, True])
async def test_items_that_follow_the_batch_get_the_row_prepare_message_gives(
    service: Service, tenant: Tenant, scheduled: bool
) -> None:
    defaults: dict[str, Any] = {}
    if scheduled:
        send_at = utcnow() + timedelta(hours=1)
        defaults = {"send_at": send_at, "expires_at": send_at + timedelta(hours=2)}
    batch = batch_request(**defaults)
    expected = await full_path_rows(service, tenant, batch)
    first = expected[0]
    assert first is not None

    shared = _SharedRow(batch, service.api_runtime.providers)
    assert shared.row_for(batch.messages[0]) is None  # nothing learnt yet
    shared.learn(first)
    rows = [shared.row_for(item) for item in batch.messages]

    assert [without_id(row) for row in rows] == [without_id(row) for row in expected]
    # No push token for the first step: the full path, for its exact errors.
    assert expected[3] is None and rows[3] is None
    assert len({row["id"] for row in rows if row is not None} | {first["id"]}) == 4


async def test_a_mixed_batch_stores_each_item_as_given(tenant: Tenant) -> None:
    send_at = utcnow() + timedelta(days=1)
    own_send_at = send_at + timedelta(hours=5)
    response = await tenant.client.post(
        "/v1/messages/batch",
        json={
            "category": "transactional",
            "cascade": [{"channel": "sms"}],
            "content": {"text": "Your parcel is on its way"},
            "metadata": {"campaign": "parcels"},
            "send_at": send_at.isoformat(),
            "messages": [
                {"to": {"phone": "+48600200001"}},
                {"to": {"phone": "+48600200002"}, "metadata": {"customer": "c-2"}},
                {"to": {"phone": "+48600200003", "email": "c@example.com"}},
                {
                    "to": {"phone": "+48600200004", "email": "d@example.com"},
                    "cascade": [{"channel": "email"}, {"channel": "sms", "timeout": 60}],
                    "content": {"text": "Your own parcel", "subject": "Parcel"},
                },
                {"to": {"phone": "+48600200005"}, "send_at": own_send_at.isoformat()},
                {"to": {"email": "f@example.com"}},  # no phone for the SMS step
                {"to": {"phone": "+48600200007"}, "idempotency_key": uuid.uuid4().hex},
                {"to": {"phone": "+48600200008"}},
            ],
        },
    )
    assert response.status_code == 207, response.text
    results = response.json()["results"]
    assert results[5]["problem"]["errors"][0]["path"] == "body.messages[5].cascade[0].channel"
    views = {
        index: (await tenant.client.get(f"/v1/messages/{result['id']}")).json()
        for index, result in enumerate(results)
        if "id" in result
    }

    assert sorted(views) == [0, 1, 2, 3, 4, 6, 7]
    assert [views[i]["to"] for i in (0, 2, 7)] == [
        {"phone": "+48600200001"},
        {"phone": "+48600200003", "email": "c@example.com"},
        {"phone": "+48600200008"},
    ]
    assert views[0]["metadata"] == views[7]["metadata"] == {"campaign": "parcels"}
    assert views[1]["metadata"] == {"customer": "c-2"}
    assert {views[i]["status"] for i in views} == {"queued"}
    assert [step["channel"] for step in views[3]["cascade"]] == ["email", "sms"]
    assert views[3]["cascade"][1]["timeout"] == 60
    assert [step["channel"] for step in views[0]["cascade"]] == ["sms"]
    assert views[4]["send_at"] != views[0]["send_at"]
    assert datetime.fromisoformat(views[4]["send_at"]) == own_send_at
    assert len({views[i]["id"] for i in views}) == len(views)


async def count_rows(service: Service, ids: list[uuid.UUID]) -> tuple[int, int]:
    async with service.worker_runtime.engine.connect() as conn:
        found_messages = (
            await conn.execute(select(func.count()).where(messages.c.id.in_(ids)))
        ).scalar_one()
        found_events = (
            await conn.execute(select(func.count()).where(events.c.message_id.in_(ids)))
        ).scalar_one()
    return int(found_messages), int(found_events)


async def test_the_copy_commits_and_rolls_back_with_the_transaction(
    service: Service, tenant: Tenant
) -> None:
    rows = [row for row in await full_path_rows(service, tenant, batch_request()) if row]
    ids = [row["id"] for row in rows]
    engine = service.api_runtime.engine

    with pytest.raises(RuntimeError):
        # Nothing ran on the connection before the COPY: the transaction must still hold it.
        async with engine.begin() as conn:
            await insert_accepted_messages(Transaction(conn), rows)
            raise RuntimeError("roll back")
    rolled_back = await count_rows(service, ids)
    async with engine.begin() as conn:
        await insert_accepted_messages(Transaction(conn), rows)

    assert rolled_back == (0, 0)
    assert await count_rows(service, ids) == (3, 3)


async def test_enqueue_many_adds_each_new_job_once_as_arq_would(service: Service) -> None:
    runtime = service.worker_runtime
    redis, queue = runtime.redis, runtime.queue
    name = f"test:enqueue:{uuid.uuid4().hex}"  # no worker reads it
    prefix = uuid.uuid4().hex
    until = utcnow() + timedelta(hours=1)

    def job(suffix: str, *args: Any, **fields: Any) -> Job:
        return Job(f"f_{suffix}", Category.TRANSACTIONAL, f"{prefix}:{suffix}", args, **fields)

    jobs = [
        job("now", "a", 1, queue=name),
        job("defer", "b", defer=timedelta(seconds=30), queue=name),
        job("until", defer_until=until, queue=name),
        job("now", "again", queue=name),  # the same id twice in one call
        job("done", queue=name),  # has a result already
    ]
    await redis.set(f"{result_key_prefix}{prefix}:done", b"result", px=60_000)
    before = timestamp_ms()
    try:
        added = await queue.enqueue_many(jobs)
        after = timestamp_ms()
        again = await queue.enqueue_many(jobs[:3])
        scores = dict(await redis.zrange(name, 0, -1, withscores=True))
        payload = deserialize_job(await redis.get(f"{job_key_prefix}{prefix}:now"))
        deferred = deserialize_job(await redis.get(f"{job_key_prefix}{prefix}:defer"))
        ttl = await redis.pttl(f"{job_key_prefix}{prefix}:until")
        arq_status = await ArqJob(f"{prefix}:until", redis, _queue_name=name).status()
        arq_again = await redis.enqueue_job("f_now", _job_id=f"{prefix}:now", _queue_name=name)
    finally:
        await redis.delete(name, f"{result_key_prefix}{prefix}:done")
        await redis.delete(*(f"{job_key_prefix}{prefix}:{s}" for s in ("now", "defer", "until")))

    assert (added, again) == (3, 0)
    assert {member.decode() for member in scores} == {
        f"{prefix}:{s}" for s in ("now", "defer", "until")
    }
    assert before <= scores[f"{prefix}:now".encode()] <= after
    assert before + 30_000 <= scores[f"{prefix}:defer".encode()] <= after + 30_000
    assert scores[f"{prefix}:until".encode()] == to_unix_ms(until)
    assert (payload.function, payload.args, payload.kwargs) == ("f_now", ("a", 1), {})
    assert (deferred.function, deferred.args, deferred.kwargs) == ("f_defer", ("b",), {})
    assert 3_600_000 < ttl <= 3_600_000 + expires_extra_ms
    assert arq_status is JobStatus.deferred
    assert arq_again is None  # arq's own enqueue sees the job as taken


async def test_many_jobs_go_as_several_script_calls_in_one_pipeline(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "SCRIPT_CHUNK", 2)
    runtime = service.worker_runtime
    name = f"test:enqueue:{uuid.uuid4().hex}"
    ids = [f"{uuid.uuid4().hex}:{i}" for i in range(5)]
    jobs = [Job("f", Category.MARKETING, job_id, (i,), queue=name) for i, job_id in enumerate(ids)]
    try:
        added = await runtime.queue.enqueue_many([*jobs, jobs[0]])
        queued = {member.decode() for member in await runtime.redis.zrange(name, 0, -1)}
    finally:
        await runtime.redis.delete(name, *(f"{job_key_prefix}{job_id}" for job_id in ids))

    assert added == 5
    assert queued == set(ids)


async def test_a_lone_job_takes_the_same_path(service: Service) -> None:
    runtime = service.worker_runtime
    name = f"test:enqueue:{uuid.uuid4().hex}"
    job = Job("f", Category.TRANSACTIONAL, uuid.uuid4().hex, queue=name)
    try:
        first = await runtime.queue.enqueue_many([job])
        second = await runtime.queue.enqueue_many([job])
    finally:
        await runtime.redis.delete(name, f"{job_key_prefix}{job.job_id}")

    assert (first, second) == (1, 0)
