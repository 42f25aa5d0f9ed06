"""The published spec is what the app serves."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from app.main import create_app
from app.settings import Settings
from tests.conftest import Service

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_published_spec_matches_the_app() -> None:
    published = json.loads(SPEC.read_text())
    assert published == create_app(Settings()).openapi(), (
        "openapi/openapi.json is out of date: run `cascade openapi`"
    )


async def test_served_spec_matches_the_published_one(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        served = (await client.get("/openapi.json")).json()
    assert served == json.loads(SPEC.read_text())
