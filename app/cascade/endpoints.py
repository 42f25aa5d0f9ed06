"""Provider status callbacks: verify the provider's signature, record, answer fast.

Where a provider sends replies on the same URL (WhatsApp, Viber), they are kept and
STOP/START applied as on the inbound route (`app.policy.endpoints.provider_inbound`)."""

from __future__ import annotations

from urllib.parse import parse_qsl

import orjson
import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Scope

from app.errors import (
    CALLBACK_RESPONSES,
    HANDSHAKE_RESPONSES,
    InvalidProviderSignature,
    InvalidVerifyToken,
    MalformedBody,
    NotFound,
    error_response,
)
from app.hotpath import JSONBytes
from app.inbound import service as inbound_service
from app.runtime import Runtime, get_runtime, utcnow
from providers.base import (
    CallbackContents,
    InvalidSignature,
    MalformedCallback,
    Provider,
    ProviderCallback,
    SharedCallbacks,
    SubscriptionHandshake,
)
from providers.registry import UnknownProvider

log = structlog.get_logger()

router = APIRouter(prefix="/v1/providers", tags=["providers"], responses=CALLBACK_RESPONSES)


@router.get(
    "/{provider}/status",
    summary="Callback URL verification handshake (e.g. WhatsApp `hub.challenge`)",
    response_class=PlainTextResponse,
    responses=HANDSHAKE_RESPONSES,
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
        raise InvalidVerifyToken("verification token rejected")
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
    summary=(
        "Delivery-status callback from a provider (signed with the provider's own scheme);"
        " WhatsApp and Viber send replies here too"
    ),
)
async def provider_status(
    provider: str, request: Request, runtime: Runtime = Depends(get_runtime)
) -> CallbackReceipt:
    adapter = callback_adapter(runtime, provider)
    try:
        contents = await callback_contents(adapter, await provider_callback(runtime, request))
    except InvalidSignature as exc:
        log.warning("provider_callback_refused", provider=provider, error=repr(exc))
        raise InvalidProviderSignature(str(exc)) from None
    except MalformedCallback as exc:
        log.warning("provider_callback_refused", provider=provider, error=repr(exc))
        raise MalformedBody(str(exc)) from None
    applied = await runtime.status_writer.record(adapter.name, contents.statuses)
    if contents.inbound:
        async with runtime.transaction() as tx:
            applied += await inbound_service.receive_all(
                tx, adapter.name, contents.inbound, runtime.settings, utcnow
            )
    return CallbackReceipt(received=len(contents.statuses) + len(contents.inbound), applied=applied)


async def callback_contents(adapter: Provider, callback: ProviderCallback) -> CallbackContents:
    """The statuses, and for a provider that sends them on the same URL the replies, of a
    status callback."""
    if isinstance(adapter, SharedCallbacks):
        return await adapter.parse_callback(callback)
    return CallbackContents(statuses=await adapter.parse_status(callback))


async def provider_status_fast(scope: Scope, body: bytes, runtime: Runtime) -> Response | None:
    """`provider_status` for a callback that verifies and parses, without the framework
    (see `app/hotpath.py`); None for anything else, which the route then refuses."""
    path: str = scope["path"]
    try:
        adapter = runtime.providers.for_callbacks(path.split("/")[3])
    except UnknownProvider:
        return None
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    query = scope["query_string"].decode("latin-1")
    callback = ProviderCallback(
        method="POST",
        url=f"{runtime.settings.callback_base}{path}{'?' + query if query else ''}",
        headers=headers,
        body=body,
        query=dict(parse_qsl(query, keep_blank_values=True)),
    )
    try:
        contents = await callback_contents(adapter, callback)
    except (InvalidSignature, MalformedCallback):
        return None
    if contents.inbound:
        return None  # replies: the route stores them, in a transaction of its own
    updates = contents.statuses
    try:
        applied = await runtime.status_writer.record(adapter.name, updates)
    except Exception as exc:
        return error_response(exc)
    return JSONBytes(orjson.dumps({"received": len(updates), "applied": applied}), 200, None)
