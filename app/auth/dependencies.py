"""FastAPI dependencies: the bearer key → the tenant, checked against a scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.service import Principal, Scope, authenticate
from app.errors import Forbidden, Unauthorized
from app.runtime import Runtime

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer csk_…`")


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    async def dependency(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        runtime: Runtime = Depends(get_runtime),
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized("send `Authorization: Bearer <api key>`")
        async with runtime.engine.connect() as conn:
            principal = await authenticate(
                conn, runtime.settings.api_key_pepper.get_secret_value(), credentials.credentials
            )
        if principal is None:
            raise Unauthorized("the API key is unknown or revoked")
        if scope not in principal.scopes and Scope.ADMIN not in principal.scopes:
            raise Forbidden(f"this operation needs the `{scope}` scope")
        return principal

    return dependency
