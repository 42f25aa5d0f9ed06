"""Receipt tokens: signed with a per-deployment key named in the token, never the API key
pepper, so nobody can compute one from a message id and confirm a push (which would stop
its fallback); keys rotate, and a removed key's tokens stop verifying."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from app.auth.receipts import ReceiptKeys, ReceiptTokenRefused, check_receipt_token, receipt_token
from app.settings import DEV_API_KEY_PEPPER, Settings
from tests.conftest import Service, Tenant
from tests.helpers import message_body, send

MESSAGE = "msg_0193a4b2c3d4e5f60718293a4b5c6d7e"


def pepper_formula_token(pepper: str, message_id: str) -> str:
    """How receipt tokens were made before key ids: anyone knowing the pepper could."""
    digest = hmac.new(pepper.encode(), f"receipt:{message_id}".encode(), hashlib.sha256).digest()
    return "rct_" + base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


def refusal(keys: ReceiptKeys, token: str, message_id: str = MESSAGE) -> str:
    with pytest.raises(ReceiptTokenRefused) as refused:
        check_receipt_token(keys, message_id, token)
    return str(refused.value)


def test_a_token_made_with_the_pepper_formula_is_refused() -> None:
    keys = ReceiptKeys.parse("rk1:a-real-receipt-secret")

    said = refusal(keys, pepper_formula_token(DEV_API_KEY_PEPPER, MESSAGE))

    assert "format" in said


def test_a_token_names_its_key_and_verifies_for_its_own_message_only() -> None:
    keys = ReceiptKeys.parse("rk1:a-real-receipt-secret")
    token = receipt_token(keys, MESSAGE)

    assert token.startswith("rct1.rk1.")
    check_receipt_token(keys, MESSAGE, token)
    assert "does not match" in refusal(keys, token, "msg_0193a4b2c3d4e5f60718293a4b5c6d7f")
    assert "does not match" in refusal(keys, token[:-1] + ("A" if token[-1] != "A" else "B"))
    # The same key id with another secret (another deployment) does not verify it either.
    assert "does not match" in refusal(ReceiptKeys.parse("rk1:another-secret"), token)


def test_rotation_keeps_old_tokens_until_their_key_is_removed() -> None:
    before = ReceiptKeys.parse("rk1:old-secret")
    during = ReceiptKeys.parse("rk2:new-secret, rk1:old-secret")
    after = ReceiptKeys.parse("rk2:new-secret")
    old_token = receipt_token(before, MESSAGE)

    check_receipt_token(during, MESSAGE, old_token)  # a still-listed old key verifies
    new_token = receipt_token(during, MESSAGE)
    assert new_token.startswith("rct1.rk2.")  # the first key signs
    check_receipt_token(after, MESSAGE, new_token)
    assert "no longer accepted" in refusal(after, old_token)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "rct1",
        "rct1..",
        "rct1.rk1.",
        "rct1.rk1.abc.def",
        "rct2.rk1.abc",
        "rct1.rk1.\u00e9\u00e9",
    ],
)
def test_malformed_tokens_are_refused_not_errors(token: str) -> None:
    refusal(ReceiptKeys.parse("rk1:a-real-receipt-secret"), token)


@pytest.mark.parametrize(
    "value",
    ["hunter22", "rk1:", ":hunter22", "rk.1:hunter22", "rk1:hunter22,rk1:x", "rk1:hunter22,"],
)
def test_malformed_receipt_keys_are_refused_without_echoing_the_secret(value: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(receipt_keys=value)

    assert "receipt_keys" in str(refused.value)
    assert "hunter22" not in str(refused.value)


def test_the_receipt_keys_are_not_the_api_key_pepper() -> None:
    settings = Settings(dev_mode=True)

    assert settings.receipt_signing_keys.signing_kid == "dev"
    assert receipt_token(settings.receipt_signing_keys, MESSAGE) != pepper_formula_token(
        settings.api_key_pepper.get_secret_value(), MESSAGE
    )
    assert repr(settings.receipt_signing_keys) == "ReceiptKeys(signing_kid='dev')"


async def _waiting_push(tenant: Tenant) -> str:
    """A message whose push the sandbox took and which waits for the device's receipt."""
    body = message_body(
        to={"push_token": "device-silent", "phone": "+48600100200"},
        cascade=[{"channel": "push", "timeout": 30}, {"channel": "sms"}],
    )
    message_id = await send(tenant.client, body)
    for _ in range(400):
        attempts = (await tenant.client.get(f"/v1/messages/{message_id}")).json()["attempts"]
        if attempts and attempts[0]["status"] == "sent":
            return message_id
        await asyncio.sleep(0.02)
    raise AssertionError("the push was never sent")


async def _post_receipt(service: Service, message_id: str, token: str | bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.base_url) as device:
        return await device.post(
            f"/v1/messages/{message_id}/receipts",
            json={"status": "delivered"},
            headers={"X-Receipt-Token": token},
        )


def _problem(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["type"].endswith("/invalid-receipt-token")
    return problem


async def test_a_forged_receipt_does_not_confirm_a_push_and_the_real_one_does(
    service: Service, tenant: Tenant
) -> None:
    message_id = await _waiting_push(tenant)
    pepper = service.settings.api_key_pepper.get_secret_value()
    rotated_out = ReceiptKeys.parse("rk0:a-removed-secret")

    forged = await _post_receipt(service, message_id, pepper_formula_token(pepper, message_id))
    removed = await _post_receipt(service, message_id, receipt_token(rotated_out, message_id))
    not_ascii = await _post_receipt(service, message_id, "rct1.dev.\u00e9".encode("latin-1"))
    still_waiting = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    confirmed = await _post_receipt(
        service, message_id, receipt_token(service.settings.receipt_signing_keys, message_id)
    )

    assert "format" in _problem(forged)["detail"]
    assert "no longer accepted" in _problem(removed)["detail"]
    assert "does not match" in _problem(not_ascii)["detail"]  # was a 500
    assert still_waiting["status"] == "sending"
    assert [a["status"] for a in still_waiting["attempts"]] == ["sent"]
    assert confirmed.json() == {"applied": True}
    delivered = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
    assert (delivered["status"], delivered["delivered_channel"]) == ("delivered", "push")
