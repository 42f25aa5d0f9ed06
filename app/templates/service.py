"""Templates: CRUD, and rendering one for a message at accept time (with locale fallback)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import Transaction
from app.errors import Conflict, FieldError, InvalidRequest, NotFound
from app.ids import IdPrefix, from_public, new_id, to_public
from app.policy.service import tenant_policy
from app.settings import Settings
from app.templates.rendering import TemplateProblem, render_variant, syntax_problems, variables
from app.templates.schemas import SmsSegmentsView, TemplateIn, TemplateView, Variants
from app.templates.segments import sms_segments
from app.templates.tables import templates
from providers.base import Channel

FALLBACK_LOCALE = "en"


def canonical_locale(tag: str) -> str:
    """BCP 47 casing: `pt-br` → `pt-BR`, `zh-hant-tw` → `zh-Hant-TW`."""
    first, *rest = tag.split("-")
    parts = [first.lower()]
    for part in rest:
        if len(part) == 2 and part.isalpha():
            parts.append(part.upper())
        elif len(part) == 4 and part.isalpha():
            parts.append(part.title())
        else:
            parts.append(part.lower())
    return "-".join(parts)


def locale_chain(requested: str | None, tenant_default: str) -> list[str]:
    """Where to look: `pl-PL` → `pl` → the tenant's default (and its parents) → `en`."""
    chain: list[str] = []
    for tag in (requested, tenant_default, FALLBACK_LOCALE):
        if not tag:
            continue
        parts = canonical_locale(tag).split("-")
        for end in range(len(parts), 0, -1):
            candidate = "-".join(parts[:end])
            if candidate not in chain:
                chain.append(candidate)
    return chain


@dataclass(frozen=True, slots=True)
class TemplateRow:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    locale: str
    description: str | None
    variants: dict[str, Any]
    created_at: datetime
    updated_at: datetime


def _row(row: Any) -> TemplateRow:
    return TemplateRow(**dict(row._mapping))


def template_view(row: TemplateRow) -> TemplateView:
    sms = row.variants.get("sms")
    segments = sms_segments(sms["text"]) if sms else None
    return TemplateView(
        id=to_public(IdPrefix.TEMPLATE, row.id),
        name=row.name,
        locale=row.locale,
        description=row.description,
        variants=Variants.model_validate(row.variants),
        variables=variables(row.variants),
        sms=SmsSegmentsView(**{k: getattr(segments, k) for k in ("encoding", "units", "segments")})
        if segments
        else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _check_syntax(variants: dict[str, Any]) -> None:
    problems = syntax_problems(variants)
    if problems:
        raise InvalidRequest(
            detail="the template does not compile",
            errors=[
                FieldError(
                    path=f"body.variants.{p.path}", message=p.message, type="template_syntax"
                )
                for p in problems
            ],
        )


def _values(body: TemplateIn) -> dict[str, Any]:
    variants = body.variants.model_dump(exclude_none=True)
    _check_syntax(variants)
    return {
        "name": body.name,
        "locale": canonical_locale(body.locale),
        "description": body.description,
        "variants": variants,
    }


def _duplicate(body: TemplateIn) -> Conflict:
    return Conflict(f"a template {body.name!r} for locale {canonical_locale(body.locale)} exists")


async def create_template(
    tx: Transaction, tenant_id: uuid.UUID, body: TemplateIn, at: datetime
) -> TemplateView:
    values = {**_values(body), "id": new_id(), "tenant_id": tenant_id}
    try:
        async with tx.conn.begin_nested():
            row = (
                await tx.conn.execute(
                    insert(templates)
                    .values(**values, created_at=at, updated_at=at)
                    .returning(templates)
                )
            ).one()
    except IntegrityError:
        raise _duplicate(body) from None
    return template_view(_row(row))


async def _get(conn: AsyncConnection, tenant_id: uuid.UUID, public_id: str) -> TemplateRow:
    template_id = from_public(IdPrefix.TEMPLATE, public_id)
    row = (
        (
            await conn.execute(
                select(templates).where(
                    templates.c.id == template_id, templates.c.tenant_id == tenant_id
                )
            )
        ).first()
        if template_id
        else None
    )
    if row is None:
        raise NotFound(f"no template {public_id}")
    return _row(row)


async def get_template(conn: AsyncConnection, tenant_id: uuid.UUID, public_id: str) -> TemplateView:
    return template_view(await _get(conn, tenant_id, public_id))


async def replace_template(
    tx: Transaction, tenant_id: uuid.UUID, public_id: str, body: TemplateIn, at: datetime
) -> TemplateView:
    current = await _get(tx.conn, tenant_id, public_id)
    try:
        async with tx.conn.begin_nested():
            row = (
                await tx.conn.execute(
                    update(templates)
                    .where(templates.c.id == current.id)
                    .values(**_values(body), updated_at=at)
                    .returning(templates)
                )
            ).one()
    except IntegrityError:
        raise _duplicate(body) from None
    return template_view(_row(row))


async def delete_template(tx: Transaction, tenant_id: uuid.UUID, public_id: str) -> None:
    current = await _get(tx.conn, tenant_id, public_id)
    await tx.conn.execute(delete(templates).where(templates.c.id == current.id))


async def list_templates(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    *,
    name: str | None,
    limit: int,
    after: tuple[str, str] | None,
) -> list[TemplateView]:
    query = select(templates).where(templates.c.tenant_id == tenant_id)
    if name is not None:
        query = query.where(templates.c.name == name)
    if after is not None:
        query = query.where(
            (templates.c.name > after[0])
            | ((templates.c.name == after[0]) & (templates.c.locale > after[1]))
        )
    query = query.order_by(templates.c.name, templates.c.locale).limit(limit)
    return [template_view(_row(row)) for row in await conn.execute(query)]


# --- rendering for messages ------------------------------------------------------------


async def find_template(
    conn: AsyncConnection, tenant_id: uuid.UUID, name: str, chain: list[str]
) -> TemplateRow | None:
    """The first template along the locale fallback chain."""
    rows = [
        _row(row)
        for row in await conn.execute(
            select(templates).where(
                templates.c.tenant_id == tenant_id,
                templates.c.name == name,
                templates.c.locale.in_(chain),
            )
        )
    ]
    by_locale = {row.locale: row for row in rows}
    return next((by_locale[tag] for tag in chain if tag in by_locale), None)


class TemplateLookup:
    """Templates for one request (a batch renders one template for many recipients)."""

    def __init__(self, conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings) -> None:
        self._conn = conn
        self._tenant_id = tenant_id
        self._settings = settings
        self._default_locale: str | None = None
        self._found: dict[tuple[str, tuple[str, ...]], TemplateRow | None] = {}

    async def find(self, name: str, locale: str | None) -> TemplateRow | None:
        if self._default_locale is None:
            policy = await tenant_policy(self._conn, self._tenant_id, self._settings)
            self._default_locale = policy.locale
        chain = locale_chain(locale, self._default_locale)
        key = (name, tuple(chain))
        if key not in self._found:
            self._found[key] = await find_template(self._conn, self._tenant_id, name, chain)
        return self._found[key]


def render_template(
    template: TemplateRow, channels: Iterable[Channel], data: Mapping[str, Any]
) -> dict[str, Any]:
    """The stored content of a template message: what each channel will send, rendered.

    Raises InvalidRequest (422) for a missing variable or a template error; a channel the
    template has no variant for is left out (the cascade check reports it).
    """
    rendered: dict[str, dict[str, Any]] = {}
    errors: list[FieldError] = []
    for channel in dict.fromkeys(channels):
        variant = template.variants.get(channel.value)
        if variant is None:
            continue
        try:
            rendered[channel.value] = render_variant(channel, variant, data)
        except TemplateProblem as problem:
            errors.append(
                FieldError(
                    path="body.content.data",
                    message=f"template {template.name} ({template.locale}) {problem.path}:"
                    f" {problem.message}",
                    type=problem.kind,
                )
            )
    if errors:
        raise InvalidRequest(detail="the template cannot be rendered with this data", errors=errors)
    return {
        "template": {
            "id": to_public(IdPrefix.TEMPLATE, template.id),
            "name": template.name,
            "locale": template.locale,
        },
        "channels": rendered,
    }
