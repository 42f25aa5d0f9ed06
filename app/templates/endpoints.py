"""HTTP for templates: parse, call the service, shape the response."""

from __future__ import annotations

import base64
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Query, Response

from app.auth.dependencies import get_runtime, require
from app.auth.service import Principal, Scope
from app.errors import PROBLEM_RESPONSES, InvalidRequest
from app.input_checks import NUL
from app.runtime import Runtime, utcnow
from app.templates import service
from app.templates.schemas import TemplateIn, TemplateList, TemplateName, TemplateView

router = APIRouter(prefix="/v1/templates", tags=["templates"], responses=PROBLEM_RESPONSES)


def _cursor(view: TemplateView) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([view.name, view.locale])).decode()


def _after(cursor: str | None) -> tuple[str, str] | None:
    if cursor is None:
        return None
    try:
        name, locale = orjson.loads(base64.urlsafe_b64decode(cursor))
        if NUL in f"{name}{locale}":
            raise ValueError("a NUL in the cursor")
        return str(name), str(locale)
    except (ValueError, TypeError):
        raise InvalidRequest("not a cursor this endpoint gave out") from None


@router.post("", status_code=201, summary="Create a template (name + locale unique)")
async def create_template(
    body: TemplateIn,
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> TemplateView:
    async with runtime.transaction() as tx:
        return await service.create_template(tx, principal.tenant_id, body, utcnow())


@router.get("", summary="Templates, by name then locale")
async def list_templates(
    name: Annotated[TemplateName | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> TemplateList:
    async with runtime.engine.connect() as conn:
        views = await service.list_templates(
            conn, principal.tenant_id, name=name, limit=limit + 1, after=_after(cursor)
        )
    more = len(views) > limit
    views = views[:limit]
    return TemplateList(data=views, next_cursor=_cursor(views[-1]) if more else None)


@router.get("/{template_id}", summary="A template, with its variables and SMS segment count")
async def get_template(
    template_id: str,
    principal: Principal = Depends(require(Scope.READ)),
    runtime: Runtime = Depends(get_runtime),
) -> TemplateView:
    async with runtime.engine.connect() as conn:
        return await service.get_template(conn, principal.tenant_id, template_id)


@router.put("/{template_id}", summary="Replace a template")
async def replace_template(
    template_id: str,
    body: TemplateIn,
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> TemplateView:
    async with runtime.transaction() as tx:
        return await service.replace_template(tx, principal.tenant_id, template_id, body, utcnow())


@router.delete("/{template_id}", status_code=204, summary="Delete a template")
async def delete_template(
    template_id: str,
    principal: Principal = Depends(require(Scope.ADMIN)),
    runtime: Runtime = Depends(get_runtime),
) -> Response:
    async with runtime.transaction() as tx:
        await service.delete_template(tx, principal.tenant_id, template_id)
    return Response(status_code=204)
