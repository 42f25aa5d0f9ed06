"""HTTP for webhook endpoints: parse, call the service, shape the response."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response

from app.auth.dependencies import require
from app.auth.service import Principal, Scope
from app.errors import PROBLEM_RESPONSES
from app.pagination import MAX_CURSOR_LENGTH, CursorParam
from app.runtime import Runtime, get_runtime, utcnow
from app.webhooks import service
from app.webhooks.schemas import (
    CreatedEndpoint,
    CreateEndpointRequest,
    DeliveryPage,
    EndpointList,
    EndpointView,
    RecoverRequest,
    ReplayRequest,
    ReplayResult,
    RotatedSecret,
    TestDeliveryResult,
    UpdateEndpointRequest,
)
from app.webhooks.sender import post_signed

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=PROBLEM_RESPONSES)

Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.post("", status_code=201, summary="Register an endpoint (its secret is shown only now)")
async def create_endpoint(
    body: CreateEndpointRequest, principal: Admin, runtime: RuntimeDep
) -> CreatedEndpoint:
    async with runtime.transaction() as tx:
        endpoint, secret = await service.create_endpoint(
            tx, principal.tenant_id, body, runtime.settings, utcnow()
        )
    return CreatedEndpoint(**service.endpoint_view(endpoint).model_dump(), secret=secret)


@router.get("", summary="The tenant's webhook endpoints")
async def list_endpoints(principal: Admin, runtime: RuntimeDep) -> EndpointList:
    async with runtime.transaction() as tx:
        endpoints = await service.list_endpoints(tx, principal.tenant_id)
    return EndpointList(data=[service.endpoint_view(e) for e in endpoints])


@router.get("/{endpoint_id}", summary="One webhook endpoint")
async def get_endpoint(endpoint_id: str, principal: Admin, runtime: RuntimeDep) -> EndpointView:
    async with runtime.transaction() as tx:
        endpoint = await service.get_endpoint(tx, principal.tenant_id, endpoint_id)
    return service.endpoint_view(endpoint)


@router.patch("/{endpoint_id}", summary="Change an endpoint; `enabled: true` re-enables it")
async def update_endpoint(
    endpoint_id: str, body: UpdateEndpointRequest, principal: Admin, runtime: RuntimeDep
) -> EndpointView:
    async with runtime.transaction() as tx:
        endpoint = await service.update_endpoint(
            tx, principal.tenant_id, endpoint_id, body, runtime.settings, utcnow()
        )
    return service.endpoint_view(endpoint)


@router.delete("/{endpoint_id}", status_code=204, summary="Delete an endpoint and its log")
async def delete_endpoint(endpoint_id: str, principal: Admin, runtime: RuntimeDep) -> Response:
    async with runtime.transaction() as tx:
        await service.delete_endpoint(tx, principal.tenant_id, endpoint_id)
    return Response(status_code=204)


@router.post(
    "/{endpoint_id}/rotate-secret",
    summary="New signing secret; the old one keeps signing beside it for 24 h",
)
async def rotate_secret(endpoint_id: str, principal: Admin, runtime: RuntimeDep) -> RotatedSecret:
    async with runtime.transaction() as tx:
        secret, expires = await service.rotate_secret(
            tx, principal.tenant_id, endpoint_id, utcnow()
        )
    return RotatedSecret(secret=secret, previous_secret_expires_at=expires)


@router.post(
    "/{endpoint_id}/replay",
    status_code=202,
    summary="Send again: one delivery by id, or every delivery since a time",
)
async def replay(
    endpoint_id: str, body: ReplayRequest, principal: Admin, runtime: RuntimeDep
) -> ReplayResult:
    async with runtime.transaction() as tx:
        count = await service.replay(tx, principal.tenant_id, endpoint_id, body, utcnow())
    return ReplayResult(replayed=count)


@router.post(
    "/{endpoint_id}/recover",
    status_code=202,
    summary="Send again every failed delivery since a time",
)
async def recover(
    endpoint_id: str, body: RecoverRequest, principal: Admin, runtime: RuntimeDep
) -> ReplayResult:
    async with runtime.transaction() as tx:
        count = await service.recover(tx, principal.tenant_id, endpoint_id, body.since, utcnow())
    return ReplayResult(replayed=count)


@router.get("/{endpoint_id}/deliveries", summary="The endpoint's delivery log, newest first")
async def list_deliveries(
    endpoint_id: str,
    principal: Admin,
    runtime: RuntimeDep,
    status: Literal["pending", "succeeded", "failed"] | None = None,
    cursor: CursorParam = None,
    before: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_CURSOR_LENGTH,
            deprecated=True,
            description="The old name of `cursor` (it also takes a delivery id: older ones"
            " only), accepted until the next release.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> DeliveryPage:
    async with runtime.transaction() as tx:
        return await service.delivery_page(
            tx,
            principal.tenant_id,
            endpoint_id,
            status=status,
            cursor=cursor,
            before=before,
            limit=limit,
        )


@router.post(
    "/{endpoint_id}/test",
    summary="Send a signed `webhook.test` event now and return the receiver's answer",
)
async def send_test_event(
    endpoint_id: str, principal: Admin, runtime: RuntimeDep
) -> TestDeliveryResult:
    async with runtime.transaction() as tx:
        plan = await service.plan_test_event(tx, principal.tenant_id, endpoint_id, utcnow())
    outcome = await post_signed(
        runtime.webhook_http, plan.url, plan.webhook_id, plan.body, plan.keys, utcnow()
    )
    return TestDeliveryResult(
        succeeded=outcome.succeeded,
        webhook_id=plan.webhook_id,
        status_code=outcome.status_code,
        latency_ms=outcome.latency_ms,
        response_body=outcome.response_body,
        error=outcome.error,
    )
