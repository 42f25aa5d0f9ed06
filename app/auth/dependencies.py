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
        wait = await runtime.request_limit.retry_after(principal.key_id)
        if wait > 0:
            raise TooManyRequests(wait)
        if scope not in principal.scopes and Scope.ADMIN not in principal.scopes:
            raise Forbidden(f"this operation needs the `{scope}` scope")
        return principal

    return dependency
