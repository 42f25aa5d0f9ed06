"""The API key admin API's shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.auth.service import Scope


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    scopes: Annotated[list[Scope], Field(min_length=1)] = [Scope.SEND, Scope.READ]


class KeyView(BaseModel):
    id: str = Field(examples=["key_0193a5b2c3d47e8f9a0b1c2d3e4f5a6b"])
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    scopes: list[Scope]
    created_at: datetime
    revoked_at: datetime | None


class CreatedKey(KeyView):
    key: str = Field(description="The secret itself: shown this once, stored only hashed.")


class KeyList(BaseModel):
    data: list[KeyView]
