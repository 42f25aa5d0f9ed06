"""FastAPI dependencies: the bearer key → the tenant, checked against a scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.service import Principal, Scope, authenticate
from app.errors import Forbidden, TooManyRequests, Unauthorized
from app.runtime import Runtime, get_runtime

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer csk_…`")


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    async def dependency(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        runtime: Runtime = Depends(get_runtime),
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized("send `Authorization: Bearer <api key>`")
        pepper = runtime.settings.api_key_pepper.get_secret_value()
        known = runtime.principals
        key_hash = known.hash_of(pepper, credentials.credentials)
        principal = known.get(key_hash)
        if principal is None:
            async with runtime.engine.connect() as conn:
                principal = await authenticate(conn, pepper, credentials.credentials)
            if principal is not None:
                known.remember(key_hash, principal)
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
    known = runtime.principals
    return known.get(known.hash_of(runtime.settings.api_key_pepper.get_secret_value(), credentials))
