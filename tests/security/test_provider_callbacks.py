"""Forged, replayed, oversized or malformed provider callbacks: refused with a 4xx, logged,
and the ledger is exactly as before."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import pytest

from providers.sandbox import sign as sandbox_sign
from tests.conftest import Service, Simulators, Tenant
from tests.helpers import message_body, send
from tests.simulators.whatsapp import sign as whatsapp_sign


@dataclass(frozen=True)
class Waiting:
    """A message whose step was sent and waits for the provider's receipt."""

    message_id: str
    attempt_id: str
    provider_message_id: str


@dataclass(frozen=True)
class Forged:
    path: str
    body: bytes
    headers: dict[str, str]


async def _waiting_sms(tenant: Tenant, provider: str, phone: str) -> Waiting:
    body = message_body(
        to={"phone": phone}, cascade=[{"channel": "sms", "provider": provider, "timeout": 300}]
    )
    message_id = await send(tenant.client, body)
    for _ in range(400):
        attempts = (await tenant.client.get(f"/v1/messages/{message_id}")).json()["attempts"]
        if attempts and attempts[0]["status"] == "sent":
            return Waiting(message_id, attempts[0]["id"], attempts[0]["provider_message_id"] or "")
        await asyncio.sleep(0.02)
    raise AssertionError("the SMS was never sent")


def _twilio(service: Service, sims: Simulators, waiting: Waiting) -> dict[str, Forged]:
    path = f"/v1/providers/twilio/status?attempt={waiting.attempt_id}"
    url = service.settings.callback_base + path
    params = {
        "AccountSid": sims.twilio.account_sid,
        "MessageSid": waiting.provider_message_id,
        "MessageStatus": "delivered",
    }
    body = urlencode(params).encode()
    form = {"content-type": "application/x-www-form-urlencoded"}
    good = sims.twilio.sign(url, params)
    other_attempt = f"/v1/providers/twilio/status?attempt=att_{uuid.uuid4().hex}"
    no_sid = {"AccountSid": sims.twilio.account_sid, "MessageStatus": "delivered"}
    return {
        "twilio: no signature": Forged(path, body, form),
        "twilio: wrong signature": Forged(path, body, {**form, "x-twilio-signature": "AAAA"}),
        "twilio: signed with another token": Forged(
            path,
            body,
            {**form, "x-twilio-signature": _twilio_sign_with("not-the-token", url, params)},
        ),
        "twilio: signature for another URL": Forged(
            other_attempt, body, {**form, "x-twilio-signature": good}
        ),
        "twilio: body changed after signing": Forged(
            path, body.replace(b"delivered", b"failed"), {**form, "x-twilio-signature": good}
        ),
        "twilio: not UTF-8": Forged(path, b"\xff\xfe" + body, {**form, "x-twilio-signature": good}),
        "twilio: signed but malformed": Forged(
            path,
            urlencode(no_sid).encode(),
            {**form, "x-twilio-signature": sims.twilio.sign(url, no_sid)},
        ),
        "twilio: oversized": Forged(
            path, body + b"&Pad=" + b"x" * (300 * 1024), {**form, "x-twilio-signature": good}
        ),
    }


def _twilio_sign_with(token: str, url: str, params: dict[str, str]) -> str:
    from twilio.request_validator import RequestValidator

    signature: str = RequestValidator(token).compute_signature(url, params)
    return signature


def _sandbox(service: Service, waiting: Waiting) -> dict[str, Forged]:
    secret = service.settings.sandbox_secret.get_secret_value()
    path = "/v1/providers/sandbox/status"
    payload = {"event_id": f"e-{uuid.uuid4().hex}", "attempt_id": waiting.attempt_id}
    body = orjson.dumps({**payload, "status": "delivered"})
    now = int(time.time())

    def signed(content: bytes, at: int, key: str = secret) -> dict[str, str]:
        return {"x-sandbox-signature": sandbox_sign(key, content, at)}

    malformed = b'{"event_id": 1, "status": "teleported"'
    return {
        "sandbox: no signature": Forged(path, body, {}),
        "sandbox: wrong secret": Forged(path, body, signed(body, now, "not-the-secret")),
        "sandbox: replayed, 10 min old": Forged(path, body, signed(body, now - 600)),
        "sandbox: timestamp 10 min ahead": Forged(path, body, signed(body, now + 600)),
        "sandbox: garbled header": Forged(path, body, {"x-sandbox-signature": "t=abc,v1=zz"}),
        "sandbox: signed but malformed": Forged(path, malformed, signed(malformed, now)),
        "sandbox: oversized": Forged(path, body + b" " * (300 * 1024), signed(body, now)),
    }


def _whatsapp(sims: Simulators) -> dict[str, Forged]:
    path = "/v1/providers/whatsapp/status"
    body = orjson.dumps({"object": "whatsapp_business_account", "entry": []})
    malformed = b'{"object": "whatsapp_business_account", "entry": "nope"}'
    return {
        "whatsapp: no signature": Forged(path, body, {}),
        "whatsapp: wrong signature": Forged(
            path, body, {"x-hub-signature-256": whatsapp_sign("not-the-secret", body)}
        ),
        "whatsapp: signed but malformed": Forged(
            path,
            malformed,
            {"x-hub-signature-256": whatsapp_sign(sims.whatsapp.app_secret, malformed)},
        ),
    }


CASES: list[tuple[str, str, int]] = [
    ("twilio", "twilio: no signature", 401),
    ("twilio", "twilio: wrong signature", 401),
    ("twilio", "twilio: signed with another token", 401),
    ("twilio", "twilio: signature for another URL", 401),
    ("twilio", "twilio: body changed after signing", 401),
    ("twilio", "twilio: not UTF-8", 401),
    ("twilio", "twilio: signed but malformed", 400),
    ("twilio", "twilio: oversized", 413),
    ("sandbox", "sandbox: no signature", 401),
    ("sandbox", "sandbox: wrong secret", 401),
    ("sandbox", "sandbox: replayed, 10 min old", 401),
    ("sandbox", "sandbox: timestamp 10 min ahead", 401),
    ("sandbox", "sandbox: garbled header", 401),
    ("sandbox", "sandbox: signed but malformed", 400),
    ("sandbox", "sandbox: oversized", 413),
    ("whatsapp", "whatsapp: no signature", 401),
    ("whatsapp", "whatsapp: wrong signature", 401),
    ("whatsapp", "whatsapp: signed but malformed", 400),
]

WAITING_ON = {"twilio": ("twilio", "+48600100777"), "sandbox": ("sandbox", "+48600100203")}


@pytest.mark.parametrize(("provider", "case", "status"), CASES, ids=[c[1] for c in CASES])
async def test_a_bad_callback_is_refused_logged_and_changes_nothing(
    service: Service,
    simulators: Simulators,
    tenant: Tenant,
    request: pytest.FixtureRequest,
    provider: str,
    case: str,
    status: int,
) -> None:
    via, phone = WAITING_ON.get(provider, ("sandbox", "+48600100203"))
    waiting = await _waiting_sms(tenant, via, phone)
    await simulators.twilio.wait_for_status_reports()
    builders: dict[str, Callable[[], dict[str, Forged]]] = {
        "twilio": lambda: _twilio(service, simulators, waiting),
        "sandbox": lambda: _sandbox(service, waiting),
        "whatsapp": lambda: _whatsapp(simulators),
    }
    forged = builders[provider]()[case]
    before = await _ledger(tenant, waiting.message_id)
    logs = _ServiceLogs(request)

    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        response = await client.post(forged.path, content=forged.body, headers=forged.headers)

    logged = logs.read()
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    if status == 401:
        problem = response.json()
        assert problem["type"] == "https://cascade.dev/problems/invalid-signature"
        assert problem["title"] == "Invalid or missing provider signature"
    assert await _ledger(tenant, waiting.message_id) == before
    if logged is not None:
        expected_log = "body_too_large" if status == 413 else "provider_callback_refused"
        assert expected_log in logged


async def test_a_replayed_valid_callback_changes_nothing_the_second_time(
    service: Service, simulators: Simulators, tenant: Tenant
) -> None:
    waiting = await _waiting_sms(tenant, "sandbox", "+48600100203")
    body = orjson.dumps(
        {"event_id": "dlr-once", "attempt_id": waiting.attempt_id, "status": "delivered"}
    )
    secret = service.settings.sandbox_secret.get_secret_value()
    headers = {"x-sandbox-signature": sandbox_sign(secret, body, int(time.time()))}

    async with httpx.AsyncClient(base_url=service.base_url) as client:
        first = await client.post("/v1/providers/sandbox/status", content=body, headers=headers)
        delivered = await _ledger(tenant, waiting.message_id)
        replay = await client.post("/v1/providers/sandbox/status", content=body, headers=headers)

    assert first.json() == {"received": 1, "applied": 1}
    assert replay.json() == {"received": 1, "applied": 0}
    assert await _ledger(tenant, waiting.message_id) == delivered


class _ServiceLogs:
    """What the in-process service logged since creation (its JSON lines go to the stderr
    pytest captures for the whole run); None when capture is off (`-s`)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._capture = request.config.pluginmanager.getplugin("capturemanager")
        if self._capturing:
            self._capture.read_global_capture()

    @property
    def _capturing(self) -> bool:
        return self._capture is not None and bool(self._capture.is_globally_capturing())

    def read(self) -> str | None:
        if not self._capturing:
            return None
        err: str = self._capture.read_global_capture()[1]
        return err


async def _ledger(tenant: Tenant, message_id: str) -> dict[str, Any]:
    response = await tenant.client.get(f"/v1/messages/{message_id}")
    assert response.status_code == 200
    message: dict[str, Any] = response.json()
    return message
