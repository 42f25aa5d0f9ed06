"""Tenant B, with an admin key, walks every operation of the spec against tenant A's ids:
nothing of A's shows, nothing of A's changes. New endpoints join the walk by themselves."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import Service, Tenant
from tests.security.spec_walk import (
    Operation,
    operations,
    request_for,
    seed,
    send_request,
    stable,
)


async def _spec(service: Service) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        spec: dict[str, Any] = (await client.get("/openapi.json")).json()
    return spec


def _walked(op: Operation) -> bool:
    # Creating things without naming an existing resource only ever touches B's own data.
    return op.secured and not (op.method == "POST" and not op.path_params)


async def _views(client: httpx.AsyncClient, ops: list[Operation], target: Any) -> dict[str, Any]:
    """Every GET the spec has, aimed at `target`'s resources, timestamps blanked."""
    views = {}
    for op in ops:
        if op.method == "GET" and op.secured:
            views[op.name] = stable(await send_request(client, request_for(op, target)))
    return views


async def _settled_views(
    client: httpx.AsyncClient, ops: list[Operation], target: Any
) -> dict[str, Any]:
    """The views once unchanged for over a second (the event feed lags events by ~1 s)."""
    views, unchanged = await _views(client, ops, target), 0
    for _ in range(40):
        await asyncio.sleep(0.4)
        again = await _views(client, ops, target)
        unchanged = unchanged + 1 if again == views else 0
        if unchanged == 3:
            return views
        views = again
    raise AssertionError("the views never settled")


async def test_tenant_b_sees_and_changes_nothing_of_tenant_a(
    service: Service, tenant: Tenant, other_tenant: Tenant, report_figure: list[str]
) -> None:
    a, b = tenant, other_tenant
    spec = await _spec(service)
    ops = operations(spec)
    lists = [op for op in ops if not op.path_params]
    b_before = await _views(b.client, lists, None)

    seeded = await seed(a.client, set(spec["paths"]))
    b_after = await _views(b.client, lists, None)
    a_before = await _settled_views(a.client, ops, seeded)

    leaks: list[str] = []
    wrong: list[str] = []
    requests = 0
    for op in filter(_walked, ops):
        for filtered in (False, True) if op.query_params else (False,):
            request = request_for(op, seeded, filtered=filtered)
            response = await send_request(b.client, request)
            requests += 1
            label = f"{op.name} {request.params or ''} -> {response.status_code}"
            # A 404 may echo the id B asked for; anything else of A's is a leak.
            asked = f"{request.url} {request.params} {request.json}"
            if any(m in response.text and m not in asked for m in seeded.markers):
                leaks.append(f"{label}: {response.text[:200]}")
            if response.status_code >= 500:
                wrong.append(label)
            elif op.path_params and "address" not in op.path_params and response.status_code != 404:
                wrong.append(label)  # another tenant's resource does not exist for B
    a_after = await _views(a.client, ops, seeded)

    report_figure.append(
        f"tenant isolation: {len(list(filter(_walked, ops)))} operations walked with B's key "
        f"against A's ids ({requests} requests), {len(leaks)} leaks"
    )
    assert leaks == [], leaks
    assert wrong == [], wrong
    assert b_after == b_before  # A's messages, stats, events never show up in B's lists
    assert a_after == a_before  # nothing B did touched A's resources


async def test_the_walk_covers_every_authenticated_path_parameter(service: Service) -> None:
    """An endpoint whose path parameter the walk cannot fill would escape it: fail instead."""
    ops = operations(await _spec(service))
    names = {name for op in ops if op.secured for name in op.path_params}
    assert names <= {"message_id", "endpoint_id", "template_id", "key_id", "address"}
