"""API keys: stored only as a peppered HMAC, shown once, scoped, revocable. Every
authenticated operation of the spec is tried with each kind of key."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update

from app.auth.service import Scope, issue_key
from app.ledger.tables import api_keys
from app.runtime import utcnow
from tests.conftest import Service, Tenant
from tests.security.spec_walk import VALID_BODIES, Operation, operations

REFUSED = {401, 403}


async def _spec(service: Service) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        spec: dict[str, Any] = (await client.get("/openapi.json")).json()
    return spec


async def _secured(service: Service) -> list[Operation]:
    return [op for op in operations(await _spec(service)) if op.secured]


async def _key(service: Service, tenant: Tenant, scopes: frozenset[Scope]) -> str:
    async with service.worker_runtime.engine.begin() as conn:
        issued = await issue_key(
            conn,
            service.settings.api_key_pepper.get_secret_value(),
            tenant.id,
            f"scopes-{'-'.join(sorted(scopes)) or 'none'}",
            utcnow(),
            scopes,
        )
    return issued.key


async def _try_all(service: Service, key: str, ops: list[Operation]) -> dict[str, int]:
    """Each operation once with `key`, on an id that does not exist: operation -> status."""
    answers = {}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=service.base_url, headers=headers) as client:
        for op in ops:
            path = op.path
            for name in op.path_params:
                path = path.replace("{" + name + "}", f"x_{uuid.uuid4().hex}")
            body = VALID_BODIES.get(op.name, {}) if op.has_body else None
            response = await client.request(op.method, path, json=body)
            answers[op.name] = response.status_code
    return answers


async def _raw_key_anywhere(service: Service, key: str) -> list[str]:
    """Tables with a row whose text form contains `key`."""
    found = []
    async with service.worker_runtime.engine.connect() as conn:
        tables = await conn.execute(
            text(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        )
        for (table,) in tables.all():
            hits = await conn.execute(
                text(f'SELECT count(*) FROM "{table}" t WHERE strpos(t::text, :key) > 0'),
                {"key": key},
            )
            if hits.scalar_one():
                found.append(table)
    return found


async def test_keys_are_stored_as_a_peppered_hmac_and_shown_once(
    service: Service, tenant: Tenant
) -> None:
    created = await tenant.client.post("/v1/keys", json={"name": "ci", "scopes": ["read"]})
    assert created.status_code in (200, 201), created.text
    key = created.json()["key"]
    listed = await tenant.client.get("/v1/keys")

    pepper = service.settings.api_key_pepper.get_secret_value()
    async with service.worker_runtime.engine.connect() as conn:
        stored = (
            await conn.execute(
                select(api_keys.c.key_hash, api_keys.c.key_prefix).where(
                    api_keys.c.key_hash
                    == hmac.new(pepper.encode(), key.encode(), hashlib.sha256).digest()
                )
            )
        ).one()
    assert key not in listed.text  # shown once: at creation only
    assert len(stored.key_prefix) < len(key) // 3
    for raw in (key, tenant.key):
        assert await _raw_key_anywhere(service, raw) == []
        assert await _raw_key_anywhere(service, raw[len(stored.key_prefix) :]) == []


@pytest.mark.parametrize(
    ("scopes", "refused"),
    [
        (frozenset(), lambda op: True),
        (frozenset({Scope.READ}), lambda op: op.method != "GET"),
        (frozenset({Scope.SEND}), lambda op: op.method == "GET"),
        (frozenset({Scope.ADMIN}), lambda op: False),
    ],
    ids=["no scope", "read", "send", "admin"],
)
async def test_every_operation_checks_the_scope(
    service: Service, tenant: Tenant, scopes: frozenset[Scope], refused: Any
) -> None:
    ops = await _secured(service)
    answers = await _try_all(service, await _key(service, tenant, scopes), ops)

    should_refuse = {op.name for op in ops if refused(op)}
    assert {name for name in should_refuse if answers[name] not in REFUSED} == set()
    if scopes == {Scope.ADMIN}:
        assert {name for name, status in answers.items() if status in REFUSED} == set()
    assert all(status < 500 for status in answers.values()), answers


async def test_a_revoked_key_is_refused_everywhere(service: Service, tenant: Tenant) -> None:
    key = await _key(service, tenant, frozenset({Scope.ADMIN}))
    async with service.worker_runtime.engine.begin() as conn:
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.key_prefix == key[:10], api_keys.c.tenant_id == tenant.id)
            .values(revoked_at=utcnow())
        )
    ops = await _secured(service)

    answers = await _try_all(service, key, ops)

    assert {name: s for name, s in answers.items() if s != 401} == {}


async def test_a_key_revoked_through_the_api_stops_working(tenant: Tenant) -> None:
    created = (await tenant.client.post("/v1/keys", json={"name": "temp"})).json()
    headers = {"Authorization": f"Bearer {created['key']}"}
    async with httpx.AsyncClient(base_url=str(tenant.client.base_url), headers=headers) as client:
        before = await client.get("/v1/messages")
        revoked = await tenant.client.delete(f"/v1/keys/{created['id']}")
        after = await client.get("/v1/messages")

    assert before.status_code == 200
    assert revoked.is_success, revoked.text
    assert after.status_code == 401
    assert after.headers["content-type"] == "application/problem+json"
