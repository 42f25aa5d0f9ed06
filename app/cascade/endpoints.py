"""Provider status callbacks: verify the provider's signature, record, answer fast."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from app.auth.dependencies import get_runtime
from app.cascade import service
from app.errors import PROBLEM_RESPONSES, Forbidden, MalformedBody, NotFound, Unauthorized
from app.runtime import Runtime, utcnow
from providers.base import (
    InvalidSignature,
    MalformedCallback,
    Provider,
    ProviderCallback,
    SubscriptionHandshake,
)
from providers.registry import UnknownProvider

log = structlog.get_logger()

router = APIRouter(prefix="/v1/providers", tags=["providers"], responses=PROBLEM_RESPONSES)


@router.get(
    "/{provider}/status",
    summary="Callback URL verification handshake (e.g. WhatsApp `hub.challenge`)",
    response_class=PlainTextResponse,
)
async def provider_handshake(
    provider: str, request: Request, runtime: Runtime = Depends(get_runtime)
) -> PlainTextResponse:
    adapter = callback_adapter(runtime, provider)
    challenge = (
        adapter.verify_subscription(dict(request.query_params))
        if isinstance(adapter, SubscriptionHandshake)
        else None
    )
    if challenge is None:
        raise Forbidden("verification token rejected")
    return PlainTextResponse(challenge)


def callback_adapter(runtime: Runtime, provider: str) -> Provider:
    """The adapter that verifies and parses `provider`'s callbacks; 404 when unknown."""
    try:
        return runtime.providers.for_callbacks(provider)
    except UnknownProvider:
        raise NotFound(f"no provider {provider!r}") from None


async def provider_callback(runtime: Runtime, request: Request) -> ProviderCallback:
    """The request as an adapter verifies it."""
    query = f"?{request.url.query}" if request.url.query else ""
    return ProviderCallback(
        method=request.method,
        # Signatures cover the URL the provider called: our public URL, not the socket's.
        url=f"{runtime.settings.callback_base}{request.url.path}{query}",
        headers=dict(request.headers),
        body=await request.body(),
        query=dict(request.query_params),
    )


class CallbackReceipt(BaseModel):
    received: int
    applied: int


@router.post(
    "/{provider}/status",
    summary="Delivery-status callback from a provider (signed with the provider's own scheme)",
)
async def provider_status(
    provider: str, request: Request, runtime: Runtime = Depends(get_runtime)
) -> CallbackReceipt:
    adapter = callback_adapter(runtime, provider)
    try:
        updates = await adapter.parse_status(await provider_callback(runtime, request))
    except InvalidSignature as exc:
        log.warning("provider_callback_refused", provider=provider, error=repr(exc))
        raise Unauthorized(f"provider signature rejected: {exc}") from None
    except MalformedCallback as exc:
        log.warning("provider_callback_refused", provider=provider, error=repr(exc))
        raise MalformedBody(str(exc)) from None
    applied = 0
    for update in updates:
        async with runtime.transaction() as tx:
            applied += await service.record_status(tx, adapter.name, update, utcnow())
    return CallbackReceipt(received=len(updates), applied=applied)
