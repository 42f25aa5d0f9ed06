"""Bytes Postgres cannot store and times UTC cannot hold, in every field of every operation
of the live spec: a NUL character (`\\u0000`) in any string, key, query parameter or path,
and a time past the end (or before the start) of the calendar once converted to UTC, are
each a 422 naming the field, never a 5xx."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from app.pagination import encode_cursor
from tests.conftest import Service, Tenant
from tests.security.spec_walk import Operation, Seeded, operations, seed

NUL_TEXT = "bad\x00byte"
NUL_IN_PATH = "bad%00byte"  # the client refuses a raw NUL in a URL
OUT_OF_UTC = ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+01:00"]
LATER = "2030-01-01T00:00:00Z"
RECIPIENT = {
    "push_token": "device-1",
    "phone": "+48600100200",
    "email": "ann@example.com",
    "whatsapp": "+48600100200",
    "telegram_chat_id": "1234",
    "viber_id": "viber-1",
    "web_push": {
        "endpoint": "https://push.example.com/x",
        "keys": {"p256dh": "B" * 40, "auth": "A" * 16},
    },
    "timezone": "Europe/Warsaw",
}
CONTENT = {
    "text": "Your code is 4711",
    "subject": "Code",
    "html": "<p>code</p>",
    "title": "Code",
}
TEMPLATE = {
    "name": "hostile",
    "locale": "en",
    "description": "d",
    "variants": {
        "sms": {"text": "Hi {{ name }}"},
        "push": {"title": "t", "body": "b"},
        "email": {"subject": "s", "text": "t", "html": "<p>h</p>"},
        "messenger": {
            "text": "m",
            "template_name": "order_update",
            "template_language": "en",
            "params": ["p"],
        },
    },
}
# A valid body for each operation that takes one; every string and key in it is tried.
BODIES: dict[str, Any] = {
    "POST /v1/keys": {"name": "k", "scopes": ["read"]},
    "POST /v1/messages": {
        "category": "transactional",
        "to": RECIPIENT,
        "content": copy.deepcopy(CONTENT),
        "cascade": [{"channel": "push", "provider": "sandbox", "success_on": "delivered"}],
        "metadata": {"order": "A-17"},
        "send_at": LATER,
        "expires_at": LATER,
    },
    "POST /v1/messages/batch": {
        "category": "transactional",
        "cascade": [{"channel": "push", "provider": "sandbox"}],
        "content": CONTENT,
        "metadata": {"campaign": "c"},
        "send_at": LATER,
        "expires_at": LATER,
        "messages": [
            {
                "to": copy.deepcopy(RECIPIENT),
                "data": {"name": "Bob", "items": ["a", {"b": "c"}]},
                "locale": "en",
                "content": copy.deepcopy(CONTENT),
                "cascade": [{"channel": "sms", "provider": "twilio"}],
                "metadata": {"k": "v"},
                "send_at": LATER,
                "expires_at": LATER,
                "idempotency_key": "item-1",
            }
        ],
    },
    "POST /v1/messages/{message_id}/receipts": {"status": "delivered", "attempt": "att_x"},
    "PUT /v1/policy": {
        "timezone": "Europe/Warsaw",
        "locale": "en",
        "quiet_hours": {"start": "21:00", "end": "08:00"},
        "frequency_cap": {"limit": 3, "window_seconds": 86400},
    },
    "POST /v1/suppressions": {"channel": "email", "address": "x@example.com", "reason": "api"},
    "PUT /v1/recipients/{address}/preferences": {
        "opt_out": {"marketing": ["sms"]},
        "preferred_channel": "email",
    },
    "POST /v1/templates": TEMPLATE,
    "PUT /v1/templates/{template_id}": copy.deepcopy(TEMPLATE),
    "POST /v1/webhooks": {
        "url": "http://127.0.0.1:9/hook",
        "description": "d",
        "event_types": ["message.delivered"],
        "categories": ["marketing"],
    },
    "PATCH /v1/webhooks/{endpoint_id}": {"url": "http://127.0.0.1:9/hook", "description": "d"},
    "POST /v1/webhooks/{endpoint_id}/replay": {"since": LATER},
    "POST /v1/webhooks/{endpoint_id}/recover": {"since": LATER},
}
OTHER_PATH_PARAMS = {"provider": "sandbox", "token": "unsub-token"}


def _leaves(value: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The location of every string and every dict key (as `(..., key, None)`)."""
    if isinstance(value, str):
        yield loc
    elif isinstance(value, dict):
        for key, item in value.items():
            yield (*loc, key, None)
            yield from _leaves(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*loc, index))


def _replaced(body: Any, loc: tuple[Any, ...], new: str) -> Any:
    changed = copy.deepcopy(body)
    if loc and loc[-1] is None:  # a key
        *parents, key, _ = loc
        holder = changed
        for part in parents:
            holder = holder[part]
        holder[key + new] = holder.pop(key)
        return changed
    holder = changed
    for part in loc[:-1]:
        holder = holder[part]
    holder[loc[-1]] = new
    return changed


def _path(loc: tuple[Any, ...]) -> str:
    """The field's path; for a key, the path of the object holding it."""
    if loc and loc[-1] is None:
        loc = loc[:-2]
    path = "body"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _date_fields(spec: dict[str, Any], schema: Any, seen: set[str] | None = None) -> set[str]:
    """The names of every date-time property reachable from `schema`."""
    seen = set() if seen is None else seen
    found: set[str] = set()
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if ref and ref not in seen:
            seen.add(ref)
            found |= _date_fields(spec, spec["components"]["schemas"][ref.rsplit("/", 1)[1]], seen)
        for name, prop in schema.get("properties", {}).items():
            if '"date-time"' in orjson.dumps(prop).decode() and "$ref" not in str(prop):
                found.add(name)
        for value in schema.values():
            if isinstance(value, dict | list):
                found |= _date_fields(spec, value, seen)
    elif isinstance(schema, list):
        for item in schema:
            found |= _date_fields(spec, item, seen)
    return found


def _url(op: Operation, seeded: Seeded, nul_in: str | None = None) -> str:
    url = op.path
    for name in op.path_params:
        value = seeded.ids.get(name) or OTHER_PATH_PARAMS[name]
        url = url.replace("{" + name + "}", NUL_IN_PATH if name == nul_in else value)
    return url


def _refused(response: httpx.Response, path: str, what: str) -> str | None:
    """Why `response` is not a 422 naming `path`, or None."""
    if response.status_code != 422:
        return f"{what}: {response.status_code} {response.text[:300]}"
    if response.headers["content-type"] != "application/problem+json":
        return f"{what}: not problem+json"
    paths = [e["path"] for e in response.json()["errors"]]
    return None if path in paths else f"{what}: errors name {paths}, not {path}"


@pytest.fixture
async def spec_and_seed(service: Service, tenant: Tenant) -> tuple[dict[str, Any], Seeded]:
    spec: dict[str, Any] = (await tenant.client.get("/openapi.json")).json()
    paths = set(spec["paths"])
    return spec, await seed(tenant.client, paths)


@pytest.mark.timeout(300)
async def test_a_nul_anywhere_in_any_operation_is_a_422_naming_the_field(
    tenant: Tenant, spec_and_seed: tuple[dict[str, Any], Seeded]
) -> None:
    spec, seeded = spec_and_seed
    problems: list[str] = []
    tried = 0
    for op in operations(spec):
        url = _url(op, seeded)
        for name in op.path_params:
            response = await tenant.client.request(op.method, _url(op, seeded, nul_in=name))
            tried += 1
            problems.append(_refused(response, "path", f"{op.name} path {name}") or "")
        for name in op.query_params:
            response = await tenant.client.request(op.method, url, params={name: NUL_TEXT})
            tried += 1
            problems.append(_refused(response, f"query.{name}", f"{op.name} ?{name}") or "")
        if not op.has_body:
            continue
        assert op.name in BODIES, f"{op.name} takes a body: add a valid one to BODIES"
        body = BODIES[op.name]
        for loc in _leaves(body):
            response = await tenant.client.request(
                op.method, url, json=_replaced(body, loc, NUL_TEXT)
            )
            tried += 1
            problems.append(_refused(response, _path(loc), f"{op.name} {loc}") or "")
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
    assert tried > 150


async def test_a_nul_in_a_provider_callback_form_or_json_is_a_422(
    service: Service, tenant: Tenant
) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        form = await client.post(
            "/v1/providers/twilio/inbound",
            content=b"From=%2B48600100200&Body=STOP%00&MessageSid=SM1",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        raw = await client.post(
            "/v1/providers/sandbox/status",
            content=b'{"events": [{"status": "delivered\\u0000"}]}',
            headers={"content-type": "application/json"},
        )
    assert _refused(form, "body.Body", "twilio form") is None, form.text
    assert _refused(raw, "body.events[0].status", "sandbox json") is None, raw.text


@pytest.mark.timeout(300)
async def test_a_time_out_of_range_in_utc_is_a_422_naming_the_field(
    tenant: Tenant, spec_and_seed: tuple[dict[str, Any], Seeded]
) -> None:
    spec, seeded = spec_and_seed
    problems: list[str] = []
    tried = 0
    for op in operations(spec):
        url = _url(op, seeded)
        operation = spec["paths"][op.path][op.method.lower()]
        for param in operation.get("parameters", []):
            if param["in"] == "query" and '"date-time"' in orjson.dumps(param["schema"]).decode():
                for value in OUT_OF_UTC:
                    response = await tenant.client.request(
                        op.method, url, params={param["name"]: value}
                    )
                    tried += 1
                    what = f"{op.name} ?{param['name']}={value}"
                    problems.append(_refused(response, f"query.{param['name']}", what) or "")
        if not op.has_body:
            continue
        dates = _date_fields(spec, operation["requestBody"])
        body = BODIES[op.name]
        named = {loc[-1] for loc in _leaves(body) if loc and isinstance(loc[-1], str)}
        assert dates <= named, f"{op.name}: give {dates - named} in its BODIES entry"
        for loc in _leaves(body):
            if not loc or loc[-1] not in dates:
                continue
            for value in OUT_OF_UTC:
                response = await tenant.client.request(
                    op.method, url, json=_replaced(body, loc, value)
                )
                tried += 1
                problems.append(_batch_item_refused(response, loc, f"{op.name} {loc}") or "")
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
    assert tried >= 20


def _batch_item_refused(response: httpx.Response, loc: tuple[Any, ...], what: str) -> str | None:
    """A 422 naming the field; a batch item may instead be refused in its own result."""
    if loc[:1] != ("messages",) or response.status_code == 422:
        return _refused(response, _path(loc), what)
    if response.status_code >= 300:
        return f"{what}: {response.status_code} {response.text[:300]}"
    problem = response.json()["results"][loc[1]]["problem"]
    paths = [e["path"] for e in (problem or {}).get("errors", [])]
    field = ".".join(str(part) for part in loc[2:])
    return None if any(p.endswith(field) for p in paths) else f"{what}: item errors {paths}"


async def test_cursors_holding_a_nul_or_an_out_of_range_time_are_a_422(
    tenant: Tenant,
) -> None:
    for path, cursor in (
        ("/v1/messages", encode_cursor("msg", OUT_OF_UTC[0], "0" * 32)),
        ("/v1/suppressions", encode_cursor("sup", "email", NUL_TEXT)),
        ("/v1/templates", encode_cursor("tpl", NUL_TEXT, "en")),
        # A well-formed cursor of another list is refused too.
        ("/v1/templates", encode_cursor("sup", "email", "a@example.com")),
    ):
        response = await tenant.client.get(path, params={"cursor": cursor})
        assert response.status_code == 422, (path, response.text)


async def test_the_last_second_utc_can_hold_is_a_time_like_any_other(tenant: Tenant) -> None:
    far = await tenant.client.post(
        "/v1/messages",
        json={**BODIES["POST /v1/messages"], "send_at": "9999-12-31T23:59:59Z", "expires_at": None},
    )
    assert far.status_code == 202, far.text
    listed = await tenant.client.get(
        "/v1/messages", params={"created_before": "9999-12-31T23:59:59Z"}
    )
    assert listed.status_code == 200, listed.text
