"""The API's template shapes: one template per (name, locale), a variant per channel."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from app.pagination import NextCursor
from app.templates.segments import Encoding

TemplateName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
LocaleTag = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$", max_length=35)
]
Source = Annotated[str, StringConstraints(min_length=1, max_length=10_000)]
ShortSource = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PushVariant(Strict):
    title: ShortSource | None = None
    body: Source


class MessengerVariant(Strict):
    """Free text, or a provider-approved template (WhatsApp) with rendered parameters."""

    text: Source | None = None
    template_name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,512}$")] | None = None
    template_language: LocaleTag | None = None
    params: Annotated[list[Source], Field(max_length=20)] = []

    @model_validator(mode="after")
    def _text_or_template(self) -> Self:
        if (self.text is None) == (self.template_name is None):
            raise ValueError("give either `text` or `template_name`")
        return self


class SmsVariant(Strict):
    text: Source


class EmailVariant(Strict):
    subject: ShortSource
    text: Source | None = None
    html: Annotated[str, StringConstraints(min_length=1, max_length=100_000)] | None = None

    @model_validator(mode="after")
    def _has_body(self) -> Self:
        if self.text is None and self.html is None:
            raise ValueError("give `text`, `html` or both")
        return self


class Variants(Strict):
    push: PushVariant | None = None
    messenger: MessengerVariant | None = None
    sms: SmsVariant | None = None
    email: EmailVariant | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Self:
        if not self.model_dump(exclude_none=True):
            raise ValueError("a template needs a variant for at least one channel")
        return self


class TemplateIn(Strict):
    name: TemplateName
    locale: LocaleTag = "en"
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    variants: Variants


class SmsSegmentsView(BaseModel):
    encoding: Encoding
    units: int = Field(description="GSM-7 septets or UCS-2 code units of the template text")
    segments: int = Field(
        description="Segments of the text as written; placeholders filled in may change it"
    )


class TemplateView(BaseModel):
    id: str = Field(examples=["tpl_0193a5b2c3d47e8f9a0b1c2d3e4f5a6b"])
    name: str
    locale: str
    description: str | None
    variants: Variants
    variables: list[str] = Field(description="The variables the variants use (`data` keys)")
    sms: SmsSegmentsView | None
    created_at: datetime
    updated_at: datetime


class TemplateList(BaseModel):
    data: list[TemplateView]
    next_cursor: NextCursor = None
