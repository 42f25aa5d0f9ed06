"""The full path through real provider protocols: API → worker → adapter → simulator →
signed callback → ledger. Each simulator speaks its provider's wire format on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import UTC, datetime

import httpx
import pytest

from tests.conftest import Service, Simulators, Tenant
from tests.helpers import attempt_statuses, eventually, message_body, send, wait_until_final
from tests.simulators.smtp import build_dsn, sign_bounce


async def test_sms_through_twilio_is_delivered_by_its_signed_status_callback(
    tenant: Tenant, simulators: Simulators
) -> None:
    body = message_body(
        to={"phone": "+48600100200"}, cascade=[{"channel": "sms", "provider": "twilio"}]
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert message["status"] == "delivered"
    attempt = message["attempts"][0]
    assert attempt["provider"] == "twilio"
    assert attempt["provider_message_id"].startswith("SM")
    submits = [r for r in simulators.twilio.message_submits if r.form.get("To") == "+48600100200"]
    assert len(submits) >= 1
    sources = [(e["status"], e["source"]) for e in message["events"] if e["attempt"]]
    assert ("delivered", "provider") in sources


async def test_invalid_number_at_twilio_falls_over_to_email_over_smtp(
    tenant: Tenant, simulators: Simulators
) -> None:
    body = message_body(
        to={"phone": "+48600100211", "email": "ann+twilio@example.com"},
        cascade=[
            {"channel": "sms", "provider": "twilio"},
            {"channel": "email", "provider": "smtp", "timeout": 3},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "rejected"), ("email", "sent")]
    assert message["attempts"][0]["error"]["code"] == "twilio:21211"
    assert message["delivered_channel"] == "email"
    mail = next(m for m in simulators.smtp.messages if "ann+twilio@example.com" in m.rcpt_tos)
    assert mail.mail_from.startswith("bounce+att_")
    assert mail.message["Subject"] == "Login code"


async def test_undelivered_sms_falls_over_to_whatsapp(tenant: Tenant) -> None:
    body = message_body(
        to={"phone": "+48600100999", "whatsapp": "+48600100201"},
        cascade=[
            {"channel": "sms", "provider": "twilio"},
            {"channel": "messenger", "provider": "whatsapp"},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "failed"), ("messenger", "delivered")]
    assert message["attempts"][0]["error"]["code"] == "twilio:30003"
    assert message["attempts"][1]["provider_message_id"].startswith("wamid.")


async def test_rate_limited_sms_with_no_time_left_falls_over(tenant: Tenant) -> None:
    # Twilio answers 429 with Retry-After 3 s; the step's 2 s window cannot wait that long.
    body = message_body(
        to={"phone": "+48600100429", "email": "ann+429@example.com"},
        cascade=[
            {"channel": "sms", "provider": "twilio", "timeout": 2},
            {"channel": "email", "provider": "smtp", "timeout": 3},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "failed"), ("email", "sent")]
    assert message["attempts"][0]["error"]["code"] == "twilio:20429"


async def test_undeliverable_whatsapp_falls_over_to_telegram_which_succeeds_on_acceptance(
    tenant: Tenant, simulators: Simulators
) -> None:
    body = message_body(
        to={"whatsapp": "+48600100226", "telegram_chat_id": "7700123"},
        cascade=[
            {"channel": "messenger", "provider": "whatsapp"},
            {"channel": "messenger", "provider": "telegram"},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("messenger", "rejected"), ("messenger", "sent")]
    assert message["attempts"][0]["error"]["code"] == "whatsapp:131026"
    assert message["cascade"][1]["success_on"] == "accepted"
    assert message["status"] == "delivered"


async def test_a_whatsapp_failure_receipt_has_the_same_code_as_that_send_error(
    tenant: Tenant,
) -> None:
    # Ending 44: accepted, then a `failed` status webhook with error 131026.
    body = message_body(
        to={"whatsapp": "+48600100244", "phone": "+48600100200"},
        cascade=[
            {"channel": "messenger", "provider": "whatsapp"},
            {"channel": "sms", "provider": "twilio"},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("messenger", "failed"), ("sms", "delivered")]
    assert message["attempts"][0]["error"]["code"] == "whatsapp:131026"
    failed = [e for e in message["events"] if e["status"] == "failed" and e["attempt"]]
    assert failed[0]["detail"]["code"] == "whatsapp:131026"


async def test_when_the_handset_got_a_whatsapp_message_is_its_delivered_events_occurred_at(
    tenant: Tenant, simulators: Simulators, monkeypatch: pytest.MonkeyPatch
) -> None:
    handset_time = 1_767_225_600  # the status webhooks' `timestamp`: 2026-01-01 00:00 UTC
    monkeypatch.setattr(simulators.whatsapp, "clock", lambda: handset_time)
    body = message_body(
        to={"whatsapp": "+48600100231"}, cascade=[{"channel": "messenger", "provider": "whatsapp"}]
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    # The `sent` receipt may come before the send's answer is stored, or after the final
    # `delivered`: only `delivered` is sure to be in the timeline by now.
    receipts = [e for e in message["events"] if e["attempt"] and e["source"] == "provider"]
    assert "delivered" in [e["status"] for e in receipts]
    for event in receipts:
        occurred_at = datetime.fromisoformat(event["occurred_at"])
        assert occurred_at == datetime.fromtimestamp(handset_time, UTC)
        assert datetime.fromisoformat(event["at"]) > occurred_at  # recorded now, not then
    # Our own events (accepted, sending, the message's delivered) have no provider time.
    ours = [e for e in message["events"] if e not in receipts]
    assert ours
    assert all(e["occurred_at"] is None for e in ours)


async def test_push_through_fcm_is_confirmed_by_the_device_receipt(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    body = message_body(
        to={"push_token": "fcm-device-token-1"},
        cascade=[{"channel": "push", "provider": "fcm", "timeout": 30}],
    )
    message_id = await send(tenant.client, body)
    sent = await eventually(
        lambda: [
            s
            for s in simulators.fcm.sends
            if s.body["message"]["data"].get("message_id") == message_id
        ]
    )
    data = sent[0].body["message"]["data"]
    assert sent[0].body["message"]["android"]["ttl"] == "30s"

    async with httpx.AsyncClient(base_url=service.base_url) as device:
        forged = await device.post(
            f"/v1/messages/{message_id}/receipts",
            json={"status": "delivered"},
            headers={"X-Receipt-Token": "rct_forged"},
        )
        confirmed = await device.post(
            f"/v1/messages/{message_id}/receipts",
            json={"status": "delivered"},
            headers={"X-Receipt-Token": data["receipt_token"]},
        )

    assert forged.status_code == 401
    assert forged.json()["type"] == "https://cascade.dev/problems/invalid-receipt-token"
    assert confirmed.json() == {"applied": True}
    message = await wait_until_final(tenant.client, message_id)
    assert message["delivered_channel"] == "push"


async def test_unregistered_fcm_token_falls_over_to_sms(tenant: Tenant) -> None:
    body = message_body(
        to={"push_token": "device-unregistered", "phone": "+48600100200"},
        cascade=[{"channel": "push", "provider": "fcm"}, {"channel": "sms"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("push", "rejected"), ("sms", "delivered")]
    assert message["attempts"][0]["error"]["code"] == "fcm:UNREGISTERED"


async def test_forged_whatsapp_webhook_is_refused(service: Service) -> None:
    payload = b'{"object":"whatsapp_business_account","entry":[]}'
    wrong = hmac.new(b"not-the-app-secret", payload, hashlib.sha256).hexdigest()
    async with httpx.AsyncClient(base_url=service.base_url) as meta:
        response = await meta.post(
            "/v1/providers/whatsapp/status",
            content=payload,
            headers={"X-Hub-Signature-256": f"sha256={wrong}"},
        )
    assert response.status_code == 401
    problem = response.json()
    assert problem["type"] == "https://cascade.dev/problems/invalid-signature"
    assert problem["title"] == "Invalid or missing provider signature"
    assert problem["detail"] == "x-hub-signature-256 does not match the body"


async def test_whatsapp_webhook_handshake_echoes_the_challenge(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as meta:
        good = await meta.get(
            "/v1/providers/whatsapp/status",
            params={
                "hub.mode": "subscribe",
                "hub.verify_token": "verify-me",
                "hub.challenge": "1158201444",
            },
        )
        bad = await meta.get(
            "/v1/providers/whatsapp/status",
            params={
                "hub.mode": "subscribe",
                "hub.verify_token": "wrong",
                "hub.challenge": "1158201444",
            },
        )
    assert (good.status_code, good.text) == (200, "1158201444")
    assert bad.status_code == 403
    assert bad.json()["title"] == "Invalid or missing verify token"


async def _post_bounce(service: Service, dsn: bytes) -> tuple[httpx.Response, httpx.Response]:
    async with httpx.AsyncClient(base_url=service.base_url) as mta:
        forged = await mta.post(
            "/v1/providers/smtp/status",
            content=dsn,
            headers={"X-Cascade-Bounce-Signature": sign_bounce(dsn, "wrong-secret")},
        )
        bounced = await mta.post(
            "/v1/providers/smtp/status",
            content=dsn,
            headers={"X-Cascade-Bounce-Signature": sign_bounce(dsn, "bounce-secret")},
        )
    return forged, bounced


async def test_a_hard_bounce_inside_the_email_window_falls_over_to_sms(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    body = message_body(
        to={"email": "gone@example.com", "phone": "+48600100200"},
        cascade=[
            {"channel": "email", "provider": "smtp", "timeout": 60},
            {"channel": "sms", "provider": "twilio"},
        ],
    )
    message_id = await send(tenant.client, body)
    # The relay took it (250): the message waits out the step's window, `sending`.
    mail = await eventually(
        lambda: next(
            (m for m in simulators.smtp.messages if "gone@example.com" in m.rcpt_tos), None
        )
    )
    for _ in range(200):  # the relay has the mail; the worker records its 250 next
        sent = (await tenant.client.get(f"/v1/messages/{message_id}")).json()
        if attempt_statuses(sent) == [("email", "sent")]:
            break
        await asyncio.sleep(0.05)
    assert (sent["status"], attempt_statuses(sent)) == ("sending", [("email", "sent")])

    forged, bounced = await _post_bounce(service, build_dsn(mail))

    assert forged.status_code == 401
    assert bounced.json() == {"received": 1, "applied": 1}
    after = await wait_until_final(tenant.client, message_id)
    assert (after["status"], after["delivered_channel"]) == ("delivered", "sms")
    assert attempt_statuses(after) == [("email", "failed"), ("sms", "delivered")]
    assert after["attempts"][0]["error"]["code"].startswith("smtp:5.")
    suppressed = (await tenant.client.get("/v1/suppressions", params={"channel": "email"})).json()[
        "data"
    ]
    assert [(s["address"], s["reason"], s["applies_to"]) for s in suppressed] == [
        ("gone@example.com", "hard_bounce", "all")
    ]
    # The next transactional email to that address is skipped, not sent.
    again = await wait_until_final(
        tenant.client, await send(tenant.client, {**body, "cascade": body["cascade"][:1]})
    )
    assert again["status"] == "suppressed"


async def test_a_bounce_after_the_email_window_is_recorded_without_a_resend(
    service: Service, tenant: Tenant, simulators: Simulators
) -> None:
    body = message_body(
        to={"email": "late-bounce@example.com", "phone": "+48600100200"},
        cascade=[
            {"channel": "email", "provider": "smtp", "timeout": 3},
            {"channel": "sms", "provider": "twilio"},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))
    assert (message["status"], message["delivered_channel"]) == ("delivered", "email")
    mail = next(m for m in simulators.smtp.messages if "late-bounce@example.com" in m.rcpt_tos)

    _, bounced = await _post_bounce(service, build_dsn(mail))

    assert bounced.json() == {"received": 1, "applied": 1}
    after = (await tenant.client.get(f"/v1/messages/{message['id']}")).json()
    assert (after["status"], after["delivered_channel"]) == ("delivered", "email")
    assert attempt_statuses(after) == [("email", "failed")]


async def test_sms_over_smpp_is_delivered_by_a_deliver_sm_receipt(
    tenant: Tenant, simulators: Simulators
) -> None:
    body = message_body(
        to={"phone": "+48600100200"}, cascade=[{"channel": "sms", "provider": "smpp"}]
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "delivered")]
    assert len(simulators.smsc.submits_to("48600100200")) >= 1
    delivered = [e for e in message["events"] if e["status"] == "delivered" and e["attempt"]]
    assert delivered[0]["source"] == "provider"


async def test_a_long_sms_over_smpp_goes_in_parts_and_its_sent_event_counts_them(
    tenant: Tenant, simulators: Simulators
) -> None:
    text = "Your parcel 1234 is on its way: track it at example.com/t/1234 " * 5  # 310 septets
    body = message_body(
        to={"phone": "+48600100201"},
        content={"text": text},
        cascade=[{"channel": "sms", "provider": "smpp"}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "delivered")]
    parts = simulators.smsc.submits_to("48600100201")
    assert len(parts) == 3 and all(part.pdu.esm_class == 0x40 for part in parts)
    assert message["attempts"][0]["provider_message_id"] == parts[-1].message_id
    # On the attempt, whichever came first: the submit's answer or the last part's receipt.
    assert message["attempts"][0]["segments"] == 3


async def test_undelivered_smpp_receipt_falls_over_to_email(tenant: Tenant) -> None:
    body = message_body(
        to={"phone": "+48600100099", "email": "ann+smpp@example.com"},
        cascade=[
            {"channel": "sms", "provider": "smpp"},
            {"channel": "email", "provider": "smtp", "timeout": 3},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "failed"), ("email", "sent")]
    assert message["attempts"][0]["error"]["code"].startswith("smpp:UNDELIV")


async def test_smpp_receipt_before_the_submit_response_still_matches(tenant: Tenant) -> None:
    body = message_body(
        to={"phone": "+48600100077"}, cascade=[{"channel": "sms", "provider": "smpp"}]
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "delivered")]


async def test_invalid_destination_at_the_smsc_falls_over(tenant: Tenant) -> None:
    body = message_body(
        to={"phone": "+48600100011", "email": "ann+smpp11@example.com"},
        cascade=[
            {"channel": "sms", "provider": "smpp"},
            {"channel": "email", "provider": "smtp", "timeout": 3},
        ],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    assert attempt_statuses(message) == [("sms", "rejected"), ("email", "sent")]
    assert message["attempts"][0]["error"]["code"] == "smpp:0x0000000B"


async def test_a_send_whose_answer_never_came_is_not_sent_again(
    tenant: Tenant, simulators: Simulators
) -> None:
    # Twilio takes the message but answers after the account's 0.5 s timeout: the worker
    # cannot know whether it was created, so it does not send it again (a second SMS); the
    # status callback, which names our attempt, settles it.
    phone = "+48600100408"
    before = sum(r.form.get("To") == phone for r in simulators.twilio.message_submits)
    body = message_body(
        to={"phone": phone},
        cascade=[{"channel": "sms", "provider": "twilio-impatient", "timeout": 30}],
    )
    message = await wait_until_final(tenant.client, await send(tenant.client, body))

    submits = sum(r.form.get("To") == phone for r in simulators.twilio.message_submits)
    assert submits - before == 1
    assert attempt_statuses(message) == [("sms", "delivered")]
    attempt = message["attempts"][0]
    assert (attempt["tries"], attempt["error"]["code"]) == (1, "twilio:timeout")
    assert attempt["provider_message_id"].startswith("SM")
