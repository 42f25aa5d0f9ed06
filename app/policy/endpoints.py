"""HTTP for policy: suppressions, the tenant's delivery policy, one-click unsubscribe and
provider inbound messages (kept as replies, STOP/START applied)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from app.auth.dependencies import require
from app.auth.service import Principal, Scope
from app.cascade.endpoints import callback_adapter, provider_callback
from app.errors import (
    CALLBACK_RESPONSES,
    PROBLEM_RESPONSES,
    FieldError,
    InvalidProviderSignature,
    InvalidRequest,
    MalformedBody,
    NotFound,
)
from app.inbound import service as inbound_service
from app.pagination import CursorParam, decode_cursor, encode_cursor
from app.policy import service
from app.policy.schemas import (
    InboundReceipt,
    PolicyIn,
    PolicyView,
    PreferencesIn,
    PreferencesView,
    Reason,
    SuppressionIn,
    SuppressionList,
    SuppressionView,
    Unsubscribed,
)
from app.runtime import Runtime, get_runtime, utcnow
from providers.base import (
    Channel,
    InboundReceiver,
    InvalidSignature,
    MalformedCallback,
)

router = APIRouter(tags=["policy"], responses=PROBLEM_RESPONSES)

Address = Annotated[str, Query(min_length=1, max_length=320)]


def _normalised(channel: Channel, address: str, path: str) -> str:
    try:
        return service.normalise_address(channel, address)
    except ValueError as exc:
        raise InvalidRequest(
            errors=[FieldError(path=path, message=str(exc), type="invalid_address")]
        ) from None


def _after(cursor: str | None) -> tuple[str, str] | None:
    return decode_cursor(cursor, "sup", (str, str)) if cursor is not None else None


@router.get("/v1/suppressions", summary="Suppressed addresses, by channel then address")
async def list_suppressions(
    channel: Channel | None = None,
    address: Annotated[str | None, Query(min_length=1, max_length=320)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: CursorParam = None,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> SuppressionList:
    async with runtime.engine.connect() as conn:
        if address is not None:
            if channel is None:
                raise InvalidRequest("filtering by address needs `channel` too")
            found = await service.get_suppression(
                conn, principal.tenant_id, channel, _normalised(channel, address, "query.address")
            )
            return SuppressionList(data=[found] if found else [])
        views = await service.list_suppressions(
            conn, principal.tenant_id, channel=channel, limit=limit + 1, after=_after(cursor)
        )
    more = len(views) > limit
    views = views[:limit]
    next_cursor = encode_cursor("sup", views[-1].channel, views[-1].address) if more else None
    return SuppressionList(data=views, next_cursor=next_cursor)


@router.post(
    "/v1/suppressions",
    status_code=201,
    summary="Suppress an address (hard_bounce and complaint apply to every category)",
)
async def add_suppression(
    body: SuppressionIn,
    principal: Principal = Depends(require(Scope.SEND)),
    runtime: Runtime = Depends(get_runtime),
) -> SuppressionView:
    address = _normalised(body.channel, body.address, "body.address")
    async with runtime.transaction() as tx:
        await service.suppress(tx, principal.tenant_id, body.channel, address, body.reason)
        view = await service.get_suppression(tx.conn, principal.tenant_id, body.channel, address)
    assert view is not None
    return view


@router.delete("/v1/suppressions", status_code=204, summary="Lift a suppression")
async def delete_suppression(
    channel: Channel,
    address: Address,
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> Response:
    normalised = _normalised(channel, address, "query.address")
    async with runtime.transaction() as tx:
        if not await service.unsuppress(tx, principal.tenant_id, channel, normalised):
            raise NotFound(f"{channel.value} address {normalised} is not suppressed")
    return Response(status_code=204)


@router.get("/v1/policy", summary="The tenant's delivery policy (time zone, quiet hours, caps)")
async def get_policy(
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> PolicyView:
    async with runtime.engine.connect() as conn:
        policy = await service.tenant_policy(conn, principal.tenant_id, runtime.settings)
    return service.policy_view(policy)


@router.put("/v1/policy", summary="Set the tenant's delivery policy")
async def put_policy(
    body: PolicyIn,
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> PolicyView:
    async with runtime.transaction() as tx:
        return await service.save_tenant_policy(
            tx, principal.tenant_id, body, runtime.settings, utcnow()
        )


@router.post(
    "/v1/unsubscribe/{token}",
    summary="One-click unsubscribe (RFC 8058), the target of an email's List-Unsubscribe",
)
async def unsubscribe(token: str, runtime: Runtime = Depends(get_runtime)) -> Unsubscribed:
    found = service.read_unsubscribe_token(
        runtime.settings.unsubscribe_secret.get_secret_value(), token
    )
    if found is None:
        raise NotFound("no such unsubscribe link")
    tenant_id, channel, address = found
    async with runtime.transaction() as tx:
        await service.suppress(
            tx, tenant_id, channel, address, Reason.UNSUBSCRIBED, source="unsubscribe"
        )
    return Unsubscribed(channel=channel)


@router.post(
    "/v1/providers/{provider}/inbound",
    tags=["providers"],
    summary="Replies recipients sent (STOP/START applied), signed with the provider's scheme",
    responses=CALLBACK_RESPONSES,
)
async def provider_inbound(
    provider: str, request: Request, runtime: Runtime = Depends(get_runtime)
) -> InboundReceipt:
    adapter = callback_adapter(runtime, provider)
    if not isinstance(adapter, InboundReceiver):
        raise NotFound(f"provider {provider!r} takes no inbound messages")
    try:
        inbound = await adapter.parse_inbound(await provider_callback(runtime, request))
    except InvalidSignature as exc:
        raise InvalidProviderSignature(str(exc)) from None
    except MalformedCallback as exc:
        raise MalformedBody(str(exc)) from None
    if not inbound:  # e.g. a Telegram update that is not a text message: answered at once
        return InboundReceipt(received=0, applied=0)
    async with runtime.transaction() as tx:
        applied = await inbound_service.receive_all(tx, provider, inbound, runtime.settings, utcnow)
    return InboundReceipt(received=len(inbound), applied=applied)


def _preference_key(address: str) -> str:
    try:
        return service.address_key(address)
    except ValueError as exc:
        raise InvalidRequest(
            errors=[FieldError(path="path.address", message=str(exc), type="invalid_address")]
        ) from None


RecipientAddress = Annotated[
    str,
    Path(
        min_length=1,
        max_length=320,
        description="Any one address of the person: E.164 phone, email, push token, chat id",
    ),
]


@router.put(
    "/v1/recipients/{address}/preferences",
    summary="Set a recipient's channel preferences (opt-outs per category, preferred channel)",
)
async def put_preferences(
    address: RecipientAddress,
    body: PreferencesIn,
    principal: Principal = Depends(require(Scope.SEND)),
    runtime: Runtime = Depends(get_runtime),
) -> PreferencesView:
    key = _preference_key(address)
    async with runtime.transaction() as tx:
        return await service.save_preferences(tx, principal.tenant_id, key, body, utcnow())


@router.get("/v1/recipients/{address}/preferences", summary="A recipient's channel preferences")
async def get_preferences(
    address: RecipientAddress,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> PreferencesView:
    key = _preference_key(address)
    async with runtime.engine.connect() as conn:
        found = await service.get_preferences(conn, principal.tenant_id, key)
    if found is None:
        raise NotFound(f"no preferences for {key}")
    return found


@router.delete(
    "/v1/recipients/{address}/preferences",
    status_code=204,
    summary="Forget a recipient's channel preferences",
)
async def delete_preferences(
    address: RecipientAddress,
    principal: Principal = Depends(require(Scope.SEND)),
    runtime: Runtime = Depends(get_runtime),
) -> Response:
    key = _preference_key(address)
    async with runtime.transaction() as tx:
        if not await service.delete_preferences(tx, principal.tenant_id, key):
            raise NotFound(f"no preferences for {key}")
    return Response(status_code=204)
