"""API keys: shown once, stored as HMAC-SHA256(pepper, key), scoped, revocable."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.ids import new_id
from app.ledger.tables import api_keys, tenants

KEY_PREFIX = "csk_"


class Scope(StrEnum):
    SEND = "send"
    READ = "read"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: uuid.UUID
    key_id: uuid.UUID
    scopes: frozenset[Scope]


@dataclass(frozen=True, slots=True)
class IssuedKey:
    id: uuid.UUID
    tenant_id: uuid.UUID
    key: str


def hash_key(pepper: str, key: str) -> bytes:
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).digest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def ensure_tenant(conn: AsyncConnection, name: str, at: datetime) -> uuid.UUID:
    existing = (await conn.execute(select(tenants.c.id).where(tenants.c.name == name))).first()
    if existing:
        return existing[0]  # type: ignore[no-any-return]
    tenant_id = new_id()
    await conn.execute(insert(tenants).values(id=tenant_id, name=name, created_at=at))
    return tenant_id


async def issue_key(
    conn: AsyncConnection,
    pepper: str,
    tenant_id: uuid.UUID,
    name: str,
    at: datetime,
    scopes: frozenset[Scope] = ALL_SCOPES,
    key: str | None = None,
) -> IssuedKey:
    """Store a new key (or adopt `key`, e.g. from CASCADE_API_KEY) and return it once."""
    key = key or generate_key()
    key_id = new_id()
    await conn.execute(
        insert(api_keys).values(
            id=key_id,
            tenant_id=tenant_id,
            name=name,
            key_hash=hash_key(pepper, key),
            key_prefix=key[:10],
            scopes=sorted(s.value for s in scopes),
            created_at=at,
        )
    )
    return IssuedKey(key_id, tenant_id, key)


async def key_exists(conn: AsyncConnection, pepper: str, key: str) -> bool:
    query = select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(pepper, key))
    return (await conn.execute(query)).first() is not None


# Known keys are remembered per process this long (no query per request): a revocation
# takes effect at once in the process that revoked, and in the others within this time.
KEY_CACHE_SECONDS = 5.0
_KEY_CACHE_MAX = 10_000


class PrincipalCache:
    """The keys one process has seen (on its `Runtime`): each key's HMAC, and its
    principal for `KEY_CACHE_SECONDS`."""

    def __init__(self) -> None:
        self._principals: dict[bytes, tuple[float, Principal]] = {}
        # (pepper, key) → its HMAC: the same every time, so computed once per key.
        self._hashes: dict[tuple[str, str], bytes] = {}

    def hash_of(self, pepper: str, key: str) -> bytes:
        key_hash = self._hashes.get((pepper, key))
        if key_hash is None:
            if len(self._hashes) >= _KEY_CACHE_MAX:
                self._hashes.clear()
            key_hash = self._hashes[(pepper, key)] = hash_key(pepper, key)
        return key_hash

    def get(self, key_hash: bytes) -> Principal | None:
        hit = self._principals.get(key_hash)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def remember(self, key_hash: bytes, principal: Principal) -> None:
        if len(self._principals) >= _KEY_CACHE_MAX:
            self._principals.clear()
        self._principals[key_hash] = (time.monotonic() + KEY_CACHE_SECONDS, principal)

    def forget_key(self, key_id: uuid.UUID) -> None:
        for key_hash, (_, principal) in list(self._principals.items()):
            if principal.key_id == key_id:
                self._principals.pop(key_hash, None)


async def authenticate(conn: AsyncConnection, pepper: str, key: str) -> Principal | None:
    row = (
        await conn.execute(
            select(api_keys.c.id, api_keys.c.tenant_id, api_keys.c.scopes).where(
                api_keys.c.key_hash == hash_key(pepper, key), api_keys.c.revoked_at.is_(None)
            )
        )
    ).first()
    if row is None:
        return None
    return Principal(row.tenant_id, row.id, frozenset(Scope(s) for s in row.scopes))


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


async def list_keys(conn: AsyncConnection, tenant_id: uuid.UUID) -> list[KeyRecord]:
    """The tenant's keys, newest first: names, prefixes and scopes, never the keys."""
    rows = await conn.execute(
        select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.key_prefix,
            api_keys.c.scopes,
            api_keys.c.created_at,
            api_keys.c.revoked_at,
        )
        .where(api_keys.c.tenant_id == tenant_id)
        .order_by(api_keys.c.created_at.desc(), api_keys.c.id.desc())
    )
    return [
        KeyRecord(r.id, r.name, r.key_prefix, list(r.scopes), r.created_at, r.revoked_at)
        for r in rows
    ]


async def revoke_key(
    conn: AsyncConnection, tenant_id: uuid.UUID, key_id: uuid.UUID, at: datetime
) -> bool:
    """Revoke one of the tenant's keys (revoking twice is fine); False when it is not theirs.
    The caller forgets it from its `PrincipalCache` once committed."""
    row = (
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.tenant_id == tenant_id)
            .values(revoked_at=func.coalesce(api_keys.c.revoked_at, at))
            .returning(api_keys.c.id)
        )
    ).first()
    return row is not None
