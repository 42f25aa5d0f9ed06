"""HTTP for API keys (admin scope): create (shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from app.auth.dependencies import require
from app.auth.schemas import CreatedKey, CreateKeyRequest, KeyList, KeyView
from app.auth.service import KeyRecord, Principal, Scope, issue_key, list_keys, revoke_key
from app.errors import PROBLEM_RESPONSES, NotFound
from app.ids import IdPrefix, from_public, to_public
from app.runtime import Runtime, get_runtime, utcnow

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=PROBLEM_RESPONSES)


def _view(record: KeyRecord) -> KeyView:
    return KeyView(
        id=to_public(IdPrefix.API_KEY, record.id),
        name=record.name,
        prefix=record.prefix,
        scopes=[Scope(s) for s in record.scopes],
        created_at=record.created_at,
        revoked_at=record.revoked_at,
    )


@router.post("", status_code=201, summary="Create an API key for this tenant (shown once)")
async def create_key(
    body: CreateKeyRequest,
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> CreatedKey:
    at = utcnow()
    async with runtime.transaction() as tx:
        issued = await issue_key(
            tx.conn,
            runtime.settings.api_key_pepper.get_secret_value(),
            principal.tenant_id,
            body.name,
            at,
            frozenset(body.scopes),
        )
    return CreatedKey(
        id=to_public(IdPrefix.API_KEY, issued.id),
        name=body.name,
        prefix=issued.key[:10],
        scopes=sorted(set(body.scopes)),
        created_at=at,
        revoked_at=None,
        key=issued.key,
    )


@router.get("", summary="This tenant's API keys (never the secrets)")
async def get_keys(
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> KeyList:
    async with runtime.engine.connect() as conn:
        records = await list_keys(conn, principal.tenant_id)
    return KeyList(data=[_view(r) for r in records])


@router.delete("/{key_id}", status_code=204, summary="Revoke an API key")
async def delete_key(
    key_id: str,
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> Response:
    uid = from_public(IdPrefix.API_KEY, key_id)
    async with runtime.transaction() as tx:
        revoked = uid is not None and await revoke_key(tx.conn, principal.tenant_id, uid, utcnow())
    if not revoked or uid is None:
        raise NotFound(f"no key {key_id}")
    # Committed: from now on this process asks the database again (the others within
    # KEY_CACHE_SECONDS).
    runtime.principals.forget_key(uid)
    return Response(status_code=204)
