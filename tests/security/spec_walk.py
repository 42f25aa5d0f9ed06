"""Walk every operation of the live OpenAPI spec: new endpoints are covered by construction.

`operations()` reads the spec the service serves; `seed()` gives a tenant one of every
resource the spec lets it create (a message, a webhook endpoint, a suppression, a
template, a second key) with unique markers in them; `request_for()` turns an operation
into a concrete request against those resources.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.helpers import FINAL

API_KEY_SECURITY = "HTTPBearer"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    path_params: tuple[str, ...]
    query_params: tuple[str, ...]
    has_body: bool
    secured: bool

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


def operations(spec: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            params = op.get("parameters", [])
            found.append(
                Operation(
                    method.upper(),
                    path,
                    tuple(p["name"] for p in params if p["in"] == "path"),
                    tuple(p["name"] for p in params if p["in"] == "query"),
                    "requestBody" in op,
                    any(API_KEY_SECURITY in s for s in op.get("security", [])),
                )
            )
    return found


@dataclass
class Seeded:
    """One tenant's resources and the strings that must never reach another tenant."""

    ids: dict[str, str] = field(default_factory=dict)  # path parameter name -> id
    query: dict[str, str] = field(default_factory=dict)  # query parameter name -> value
    markers: set[str] = field(default_factory=set)


def _unique_phone() -> str:
    # A valid Polish mobile whose last two digits pick no special sandbox outcome.
    return f"+48600{uuid.uuid4().int % 10_000:04d}{uuid.uuid4().int % 90 + 10:02d}"


async def seed(client: httpx.AsyncClient, paths: set[str]) -> Seeded:
    """Create one of each resource the spec offers (a path absent from it is skipped)."""
    tag = uuid.uuid4().hex[:12]
    seeded = Seeded()
    phone, email = _unique_phone(), f"iso-{tag}@example.com"
    message = await _create(
        client,
        "/v1/messages",
        {
            "category": "transactional",
            "to": {"phone": phone, "email": email},
            "content": {"text": f"secret {tag}", "subject": "isolation"},
            "cascade": [{"channel": "sms"}],
            "metadata": {"marker": tag},
        },
    )
    seeded.ids["message_id"] = message["id"]
    # A person's address names no resource of a tenant's: B asking about it sees only B's.
    seeded.ids["address"] = phone
    seeded.query.update({"to": phone, "metadata": f"marker={tag}"})
    seeded.markers |= {message["id"], phone, email, tag}
    final = await _wait_final(client, message["id"])
    seeded.markers |= {a["id"] for a in final["attempts"]}

    if "/v1/webhooks" in paths:
        url = f"http://127.0.0.1:9/hooks/{tag}"
        # Marketing only: A's transactional message produces no deliveries to this URL.
        endpoint = await _create(
            client, "/v1/webhooks", {"url": url, "categories": ["marketing"]}, 201
        )
        seeded.ids["endpoint_id"] = endpoint["id"]
        seeded.markers |= {endpoint["id"], url, endpoint["secret"]}
    if "/v1/suppressions" in paths:
        address = f"supp-{tag}@example.com"
        await _create(client, "/v1/suppressions", {"channel": "email", "address": address})
        seeded.query.update({"address": address, "channel": "email"})
        seeded.markers.add(address)
    if "/v1/templates" in paths:
        name = f"tpl-{tag}"
        template = await _create(
            client,
            "/v1/templates",
            {"name": name, "variants": {"sms": {"text": f"Hi {tag}"}}},
        )
        seeded.ids["template_id"] = template["id"]
        seeded.query["name"] = name
        seeded.markers |= {template["id"], name}
    if "/v1/keys" in paths:
        key = await _create(client, "/v1/keys", {"name": f"key-{tag}", "scopes": ["read"]})
        seeded.ids["key_id"] = key["id"]
        seeded.markers |= {key["id"], key["key"], f"key-{tag}"}
    return seeded


# Bodies that pass validation, so a refusal can only come from the lookup (404).
VALID_BODIES: dict[str, Any] = {
    "POST /v1/messages/{message_id}/receipts": {"status": "delivered"},
    "PATCH /v1/webhooks/{endpoint_id}": {"enabled": False},
    "POST /v1/webhooks/{endpoint_id}/replay": {"since": "2020-01-01T00:00:00Z"},
    "POST /v1/webhooks/{endpoint_id}/recover": {"since": "2020-01-01T00:00:00Z"},
    "PUT /v1/templates/{template_id}": {"name": "hijacked", "variants": {"sms": {"text": "x"}}},
    "PUT /v1/policy": {"timezone": "Europe/Warsaw"},
}


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    params: dict[str, str]
    json: Any


def request_for(op: Operation, target: Seeded, *, filtered: bool = False) -> Request:
    """`op` aimed at `target`'s resources; `filtered` also sets its query filters."""
    url = op.path
    for name in op.path_params:
        if name not in target.ids:
            raise LookupError(
                f"{op.name}: no seeded resource for path parameter {name!r}; teach spec_walk.seed"
            )
        url = url.replace("{" + name + "}", target.ids[name])
    params = (
        {name: target.query[name] for name in op.query_params if name in target.query}
        if filtered
        else {}
    )
    body = VALID_BODIES.get(op.name, {}) if op.has_body else None
    return Request(op.method, url, params, body)


async def send_request(client: httpx.AsyncClient, request: Request) -> httpx.Response:
    return await client.request(
        request.method, request.url, params=request.params or None, json=request.json
    )


_VOLATILE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")


def stable(response: httpx.Response) -> tuple[int, str]:
    """The answer with timestamps blanked: `now`-relative windows move between two calls."""
    return response.status_code, _VOLATILE.sub("<time>", response.text)


async def _create(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], status: int | None = None
) -> dict[str, Any]:
    response = await client.post(path, json=body)
    ok = response.status_code == status if status else response.is_success
    assert ok, f"seeding {path} failed ({response.status_code}): {response.text}"
    created: dict[str, Any] = response.json()
    return created


async def _wait_final(client: httpx.AsyncClient, message_id: str) -> dict[str, Any]:
    for _ in range(500):
        message: dict[str, Any] = (await client.get(f"/v1/messages/{message_id}")).json()
        if message["status"] in FINAL:
            return message
        await asyncio.sleep(0.02)
    raise AssertionError(f"{message_id} never reached a final status")
