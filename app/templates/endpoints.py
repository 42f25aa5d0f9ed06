"""HTTP for templates: parse, call the service, shape the response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from app.auth.dependencies import require
from app.auth.service import Principal, Scope
from app.errors import PROBLEM_RESPONSES
from app.pagination import CursorParam, decode_cursor, encode_cursor
from app.runtime import Runtime, get_runtime, utcnow
from app.templates import service
from app.templates.schemas import TemplateIn, TemplateList, TemplateName, TemplateView

router = APIRouter(prefix="/v1/templates", tags=["templates"], responses=PROBLEM_RESPONSES)


def _cursor(view: TemplateView) -> str:
    return encode_cursor("tpl", view.name, view.locale)


def _after(cursor: str | None) -> tuple[str, str] | None:
    return decode_cursor(cursor, "tpl", (str, str)) if cursor is not None else None


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
    cursor: CursorParam = None,
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
