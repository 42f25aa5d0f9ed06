"""Bad input gets a clear 4xx problem+json, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Service, Tenant
from tests.helpers import message_body, send

BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown channel", message_body(cascade=[{"channel": "pigeon"}]), "body.cascade[0].channel"),
    ("empty cascade", message_body(cascade=[]), "body.cascade"),
    (
        "missing address",
        message_body(to={"email": "a@example.com"}, cascade=[{"channel": "sms"}]),
        "body.cascade[0].channel",
    ),
    ("invalid phone", message_body(to={"phone": "0048 nope"}), "body.to.phone"),
    ("phone without +", message_body(to={"phone": "48600100200"}), "body.to.phone"),
    ("invalid email", message_body(to={"email": "not-an-email"}), "body.to.email"),
    ("unknown category", message_body(category="spam"), "body.category"),
    (
        "unknown provider",
        message_body(cascade=[{"channel": "sms", "provider": "nope"}]),
        "body.cascade[0].provider",
    ),
    (
        "zero timeout",
        message_body(cascade=[{"channel": "sms", "timeout": 0}]),
        "body.cascade[0].timeout",
    ),
    ("unknown field", message_body(colour="red"), "body.colour"),
    ("no content", message_body(content={}), "body.content"),
]


@pytest.mark.parametrize(("case", "body", "path"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_invalid_message_is_a_422_problem(
    tenant: Tenant, case: str, body: dict[str, Any], path: str
) -> None:
    response = await tenant.client.post("/v1/messages", json=body)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert {"type", "title", "status", "detail", "errors"} <= problem.keys()
    assert path in [error["path"] for error in problem["errors"]]


async def test_malformed_json_is_a_400_problem(tenant: Tenant) -> None:
    response = await tenant.client.post(
        "/v1/messages", content=b'{"category": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["type"].endswith("/malformed-body")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_is_a_413_problem(tenant: Tenant, chunked: bool) -> None:
    huge = b'{"pad": "' + b"x" * 300_000 + b'"}'

    async def stream() -> Any:
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    content: Any = stream() if chunked else huge
    response = await tenant.client.post(
        "/v1/messages", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


async def test_missing_key_is_401(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as anonymous:
        response = await anonymous.post("/v1/messages", json=message_body())
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


async def test_invalid_key_is_401(service: Service) -> None:
    headers = {"Authorization": "Bearer csk_not-a-real-key"}
    async with httpx.AsyncClient(base_url=service.base_url, headers=headers) as client:
        response = await client.get("/v1/messages/msg_0193a5b2c3d47e8f9a0b1c2d3e4f5a6b")
    assert response.status_code == 401


async def test_another_tenants_message_is_404(tenant: Tenant, other_tenant: Tenant) -> None:
    message_id = await send(tenant.client, message_body())

    response = await other_tenant.client.get(f"/v1/messages/{message_id}")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("bad_id", ["nope", "msg_zz", "att_0193a5b2c3d47e8f9a0b1c2d3e4f5a6b"])
async def test_malformed_message_id_is_404(tenant: Tenant, bad_id: str) -> None:
    response = await tenant.client.get(f"/v1/messages/{bad_id}")
    assert response.status_code == 404


async def test_unknown_route_is_a_404_problem(tenant: Tenant) -> None:
    response = await tenant.client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_health_and_readiness(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}


PROVIDER_CALLBACKS = [
    ("twilio", "status"),
    ("twilio", "inbound"),
    ("whatsapp", "status"),
    ("sandbox", "status"),
    ("sandbox", "inbound"),
    ("smtp", "status"),
]


@pytest.mark.parametrize(
    ("provider", "route"), PROVIDER_CALLBACKS, ids=[f"{p}-{r}" for p, r in PROVIDER_CALLBACKS]
)
async def test_an_unsigned_provider_callback_is_an_invalid_signature_problem_not_an_api_key_one(
    service: Service, provider: str, route: str
) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as caller:
        response = await caller.post(
            f"/v1/providers/{provider}/{route}",
            content=b"{}",
            headers={"content-type": "application/json"},
        )

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "https://cascade.dev/problems/invalid-signature"
    assert problem["title"] == "Invalid or missing provider signature"
    assert "API key" not in problem["title"] + problem["detail"]


async def test_a_refused_verify_token_handshake_says_so_not_that_a_scope_is_missing(
    service: Service,
) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as meta:
        response = await meta.get(
            "/v1/providers/whatsapp/status",
            params={"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "7"},
        )

    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "https://cascade.dev/problems/invalid-verify-token"
    assert problem["title"] == "Invalid or missing verify token"


async def test_every_problem_type_is_listed_in_the_api_description(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        description = (await client.get("/openapi.json")).json()["info"]["description"]

    for slug in ("invalid-signature", "invalid-verify-token", "invalid-receipt-token"):
        assert f"| `{slug}` |" in description
