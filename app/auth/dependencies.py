"""FastAPI dependencies: the bearer key → the tenant, checked against a scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.service import (
    Principal,
    Scope,
    authenticate,
    cached_principal,
    hash_key,
    remember_principal,
)
from app.errors import Forbidden, TooManyRequests, Unauthorized
from app.runtime import Runtime

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer csk_…`")


# async: FastAPI runs a plain `def` dependency on a worker thread, a hop per request.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    async def dependency(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        runtime: Runtime = Depends(get_runtime),
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized("send `Authorization: Bearer <api key>`")
        pepper = runtime.settings.api_key_pepper.get_secret_value()
        key_hash = hash_key(pepper, credentials.credentials)
        principal = cached_principal(key_hash)
        if principal is None:
            async with runtime.engine.connect() as conn:
                principal = await authenticate(conn, pepper, credentials.credentials)
            if principal is not None:
                remember_principal(key_hash, principal)
        if principal is None:
            raise Unauthorized("the API key is unknown or revoked")
        await admit(runtime, principal, scope)
        return principal

    return dependency


async def admit(runtime: Runtime, principal: Principal, scope: Scope) -> None:
    """The key's rate limit (a slot taken), then its scope; raises the refusal."""
    wait = await runtime.request_limit.retry_after(principal.key_id)
    if wait > 0:
        raise TooManyRequests(wait)
    if scope not in principal.scopes and Scope.ADMIN not in principal.scopes:
        raise Forbidden(f"this operation needs the `{scope}` scope")


def known_principal(runtime: Runtime, authorization: bytes | None) -> Principal | None:
    """The principal of a `Bearer` key this process knows (cached), else None: the caller
    then takes the full path (`require`), which looks the key up or refuses it."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    pepper = runtime.settings.api_key_pepper.get_secret_value()
    key_hash = _hashes.get((pepper, credentials))
    if key_hash is None:
        if len(_hashes) >= 10_000:
            _hashes.clear()
        key_hash = _hashes[(pepper, credentials)] = hash_key(pepper, credentials)
    return cached_principal(key_hash)


# (pepper, key) → its HMAC, the principal cache's key: the same every time; what the key
# may do is still only as fresh as that cache (5 s).
_hashes: dict[tuple[str, str], bytes] = {}
