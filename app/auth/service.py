"""API keys: shown once, stored as HMAC-SHA256(pepper, key), scoped, revocable."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import insert, select
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


def receipt_token(pepper: str, message_id: str) -> str:
    """The per-message token a device presents to confirm a push (no API key on devices)."""
    digest = hmac.new(pepper.encode(), f"receipt:{message_id}".encode(), hashlib.sha256).digest()
    return "rct_" + base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


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
