"""Viber Bot API adapter, against the Viber simulator over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import httpx2
import pydantic
import pytest

from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    InboundMessage,
    InvalidSignature,
    MalformedCallback,
    OutboundMessage,
    Provider,
    ProviderCallback,
    ReceiptStatus,
    Recipient,
    Rejected,
    StatusUpdate,
    TransientProviderError,
)
from providers.viber import ViberConfig, ViberProvider, classify_response
from tests.simulators.twilio import CallbackReceiver, ReceivedCallback
from tests.simulators.viber import FAILED_DESC, SimulatedReceiver, ViberSimulator

AUTH_TOKEN = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9"
SENDER_NAME = "Cascade Alerts"
NOW = 1_800_000_000.25
NOW_MS = int(NOW * 1000)


@pytest.fixture(scope="module")
async def running_receiver() -> AsyncIterator[CallbackReceiver]:
    async with CallbackReceiver() as callback_receiver:
        yield callback_receiver


@pytest.fixture(scope="module")
async def running_viber(running_receiver: CallbackReceiver) -> AsyncIterator[ViberSimulator]:
    webhook = running_receiver.url_for("/v1/providers/viber/status")
    async with ViberSimulator(auth_token=AUTH_TOKEN, webhook_url=webhook, clock=lambda: NOW) as sim:
        yield sim


@pytest.fixture
def receiver(running_receiver: CallbackReceiver) -> CallbackReceiver:
    running_receiver.reset()
    return running_receiver


@pytest.fixture
def viber(running_viber: ViberSimulator, receiver: CallbackReceiver) -> ViberSimulator:
    running_viber.reset()
    running_viber.webhook_url = receiver.url_for("/v1/providers/viber/status")
    return running_viber


def make_config(viber: ViberSimulator, **overrides: object) -> ViberConfig:
    fields: dict[str, object] = {
        "base_url": viber.base_url,
        "auth_token": AUTH_TOKEN,
        "sender_name": SENDER_NAME,
        "timeout_seconds": 2,
    }
    return ViberConfig.model_validate(fields | overrides)


@pytest.fixture
async def provider(viber: ViberSimulator) -> AsyncIterator[ViberProvider]:
    adapter = ViberProvider(make_config(viber))
    yield adapter
    await adapter.aclose()


def message(to: str, *, text: str | None = "Your table is ready") -> OutboundMessage:
    return OutboundMessage(
        message_id="msg_01",
        attempt_id="att_01",
        category=Category.SERVICE,
        channel=Channel.MESSENGER,
        address=to,
        content=Content(text=text),
        timeout_seconds=300,
    )


def as_callback(received: ReceivedCallback) -> ProviderCallback:
    return ProviderCallback(
        method=received.method,
        url=received.url,
        headers=received.headers,
        body=received.body,
        query=received.query,
    )


def signed(payload: object, *, token: str = AUTH_TOKEN) -> ProviderCallback:
    body = json.dumps(payload).encode()
    signature = hmac.new(token.encode(), body, hashlib.sha256).hexdigest()
    return ProviderCallback(
        method="POST",
        url="https://cascade.example/v1/providers/viber/status",
        headers={"Content-Type": "application/json", "X-Viber-Content-Signature": signature},
        body=body,
    )


async def send_and_collect(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver, to: str
) -> tuple[Accepted, list[StatusUpdate]]:
    result = await provider.send(message(to))
    assert isinstance(result, Accepted)
    await viber.wait_for_callbacks()
    updates = [u for r in receiver.received for u in await provider.parse_status(as_callback(r))]
    return result, updates


# Sending


async def test_send_posts_viber_json_with_the_auth_token_header(
    provider: ViberProvider, viber: ViberSimulator
) -> None:
    result = await provider.send(message(SimulatedReceiver.DELIVERED))

    [request] = viber.requests
    assert request.method == "POST"
    assert request.path == "/pa/send_message"
    assert request.headers["x-viber-auth-token"] == AUTH_TOKEN
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "receiver": SimulatedReceiver.DELIVERED,
        "type": "text",
        "text": "Your table is ready",
        "sender": {"name": SENDER_NAME},
        "tracking_data": "att_01",
    }
    assert isinstance(result, Accepted)


async def test_the_message_token_is_kept_exactly_although_it_exceeds_double_precision(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver
) -> None:
    result, _ = await send_and_collect(provider, viber, receiver, SimulatedReceiver.DELIVERED)

    [callback] = viber.callbacks
    token = callback.json()["message_token"]
    assert isinstance(token, int) and token > 2**53
    assert result.provider_message_id == str(token)


async def test_the_sender_avatar_is_sent_when_configured(viber: ViberSimulator) -> None:
    avatar = "https://cdn.cascade.example/avatar.jpg"
    adapter = ViberProvider(make_config(viber, sender_avatar=avatar))
    try:
        await adapter.send(message(SimulatedReceiver.DELIVERED))
    finally:
        await adapter.aclose()

    assert viber.requests[0].json()["sender"] == {"name": SENDER_NAME, "avatar": avatar}


@pytest.mark.parametrize(
    ("to", "code"),
    [
        (SimulatedReceiver.NOT_REGISTERED, "viber:receiverNotRegistered"),
        (SimulatedReceiver.NOT_SUBSCRIBED, "viber:receiverNotSubscribed"),
        (SimulatedReceiver.OLD_DEVICE, "viber:receiverNoSuitableDevice"),
    ],
)
async def test_recipient_errors_are_rejected(provider: ViberProvider, to: str, code: str) -> None:
    result = await provider.send(message(to))

    assert isinstance(result, Rejected)
    assert result.code == code
    assert result.detail


async def test_rate_limiting_is_transient(provider: ViberProvider) -> None:
    with pytest.raises(TransientProviderError) as caught:
        await provider.send(message(SimulatedReceiver.THROTTLED))

    assert caught.value.code == "viber:tooManyRequests"


async def test_a_suspended_bot_is_a_transient_provider_fault(provider: ViberProvider) -> None:
    with pytest.raises(TransientProviderError) as caught:
        await provider.send(message(SimulatedReceiver.SUSPENDED))

    assert caught.value.code == "viber:publicAccountSuspended"
    assert caught.value.provider_fault


async def test_a_wrong_auth_token_is_a_transient_provider_fault(viber: ViberSimulator) -> None:
    adapter = ViberProvider(make_config(viber, auth_token="not-the-token"))
    try:
        with pytest.raises(TransientProviderError) as caught:
            await adapter.send(message(SimulatedReceiver.DELIVERED))
    finally:
        await adapter.aclose()

    assert caught.value.code == "viber:invalidAuthToken"
    assert caught.value.provider_fault


async def test_an_http_outage_is_transient_and_honours_retry_after(
    provider: ViberProvider,
) -> None:
    with pytest.raises(TransientProviderError) as caught:
        await provider.send(message(SimulatedReceiver.SERVER_ERROR))

    assert caught.value.code == "viber:http_503"
    assert caught.value.retry_after == 2


async def test_an_unreachable_api_is_transient(viber: ViberSimulator) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    adapter = ViberProvider(make_config(viber, base_url=f"http://127.0.0.1:{closed_port}"))
    try:
        with pytest.raises(TransientProviderError) as caught:
            await adapter.send(message(SimulatedReceiver.DELIVERED))
    finally:
        await adapter.aclose()

    assert caught.value.code == "viber:transport"


@pytest.mark.parametrize(
    ("text", "code"),
    [(None, "viber:missing_text"), ("", "viber:missing_text"), ("x" * 7001, "viber:text_too_long")],
)
async def test_unsendable_text_is_rejected_without_calling_viber(
    provider: ViberProvider, viber: ViberSimulator, text: str | None, code: str
) -> None:
    result = await provider.send(message(SimulatedReceiver.DELIVERED, text=text))

    assert isinstance(result, Rejected) and result.code == code
    assert viber.requests == []


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (3, "rejected"),  # badData: this request can never succeed
        (4, "rejected"),  # missingData
        (13, "rejected"),  # apiVersionNotSupported: the user's devices are too old
        (14, "rejected"),
        (1, "provider"),
        (2, "provider"),
        (7, "provider"),  # publicAccountBlocked
        (8, "provider"),
        (9, "provider"),
        (10, "provider"),  # webhookNotSet
        (15, "provider"),
        (99, "provider"),  # unknown codes
    ],
)
def test_viber_status_codes_map_to_outcomes(status: int, outcome: str) -> None:
    response = httpx2.Response(200, json={"status": status, "status_message": "why"})

    if outcome == "rejected":
        result = classify_response(response, fallback_id="att_01")
        assert isinstance(result, Rejected) and result.detail == "why"
        return
    with pytest.raises(TransientProviderError) as caught:
        classify_response(response, fallback_id="att_01")
    assert caught.value.provider_fault
    assert caught.value.detail == "why"


@pytest.mark.parametrize(
    "response",
    [
        httpx2.Response(200, text="<html>proxy</html>"),
        httpx2.Response(200, json={"status": "0"}),
        httpx2.Response(404, text="Not Found"),
        httpx2.Response(401, text="Unauthorized"),
    ],
)
def test_unexpected_answers_are_transient(response: httpx2.Response) -> None:
    with pytest.raises(TransientProviderError):
        classify_response(response, fallback_id="att_01")


def test_an_ok_without_a_token_is_still_accepted() -> None:
    # Viber took the message: sending it again would duplicate it.
    result = classify_response(httpx2.Response(200, json={"status": 0}), fallback_id="att_01")

    assert result == Accepted("att_01")


# Receipts


async def test_delivered_receipt_becomes_delivered(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver
) -> None:
    result, updates = await send_and_collect(provider, viber, receiver, SimulatedReceiver.DELIVERED)

    token = result.provider_message_id
    assert updates == [
        StatusUpdate(
            status=ReceiptStatus.DELIVERED,
            event_id=f"{token}:delivered",
            provider_message_id=token,
            occurred_at=datetime.fromtimestamp(NOW_MS / 1000, UTC),
        )
    ]


async def test_seen_receipt_becomes_read(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver
) -> None:
    result, updates = await send_and_collect(provider, viber, receiver, SimulatedReceiver.SEEN)

    token = result.provider_message_id
    assert [(u.status, u.event_id) for u in updates] == [
        (ReceiptStatus.DELIVERED, f"{token}:delivered"),
        (ReceiptStatus.READ, f"{token}:seen"),
    ]


async def test_failed_receipt_becomes_failed_with_the_description(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver
) -> None:
    result, updates = await send_and_collect(provider, viber, receiver, SimulatedReceiver.FAILED)

    [update] = updates
    assert update.status is ReceiptStatus.FAILED
    assert update.provider_message_id == result.provider_message_id
    assert update.error_code == "viber:failed"
    assert update.error_detail == FAILED_DESC


async def test_a_silent_receiver_sends_no_receipt(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver
) -> None:
    _, updates = await send_and_collect(provider, viber, receiver, SimulatedReceiver.SILENT)

    assert updates == []
    assert receiver.received == []


async def test_the_set_webhook_check_is_signed_and_carries_no_status(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver
) -> None:
    url = receiver.url_for("/v1/providers/viber/status")
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{viber.base_url}/pa/set_webhook",
            json={"url": url, "event_types": ["delivered", "seen", "failed"]},
            headers={"X-Viber-Auth-Token": AUTH_TOKEN},
        )

    assert answer.json()["status"] == 0
    [check] = receiver.received
    assert json.loads(check.body)["event"] == "webhook"
    assert await provider.parse_status(as_callback(check)) == []


@pytest.mark.parametrize(
    "event",
    [
        {"event": "subscribed", "timestamp": NOW_MS, "user": {"id": "u1=", "name": "A"}},
        {"event": "unsubscribed", "timestamp": NOW_MS, "user_id": "u1="},
        {"event": "conversation_started", "timestamp": NOW_MS, "type": "open", "user": {}},
        {"event": "message", "timestamp": NOW_MS, "message_token": 1, "message": {}},
        {"event": "client_status", "timestamp": NOW_MS},
    ],
)
async def test_events_other_than_receipts_carry_no_status(
    provider: ViberProvider, event: dict[str, object]
) -> None:
    assert await provider.parse_status(signed(event)) == []


async def test_a_message_token_given_as_text_is_accepted(provider: ViberProvider) -> None:
    event = {"event": "seen", "timestamp": NOW_MS, "message_token": "4912661846655238145"}

    [update] = await provider.parse_status(signed(event))

    assert update.provider_message_id == "4912661846655238145"
    assert update.event_id == "4912661846655238145:seen"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"timestamp": 1}',
        b'{"event": "delivered", "timestamp": 1}',
        b'{"event": "failed", "message_token": 1.5}',
        b'{"event": "seen", "message_token": true}',
    ],
)
async def test_signed_but_unreadable_callbacks_are_malformed(
    provider: ViberProvider, body: bytes
) -> None:
    signature = hmac.new(AUTH_TOKEN.encode(), body, hashlib.sha256).hexdigest()
    callback = ProviderCallback(
        method="POST",
        url="https://x/cb",
        headers={"X-Viber-Content-Signature": signature},
        body=body,
    )

    with pytest.raises(MalformedCallback):
        await provider.parse_status(callback)


# Signatures


async def test_a_tampered_body_is_refused(
    provider: ViberProvider, viber: ViberSimulator, receiver: CallbackReceiver
) -> None:
    await send_and_collect(provider, viber, receiver, SimulatedReceiver.DELIVERED)
    [received] = receiver.received
    forged = received.body.replace(b'"delivered"', b'"failed"')

    with pytest.raises(InvalidSignature):
        await provider.parse_status(
            ProviderCallback(method="POST", url=received.url, headers=received.headers, body=forged)
        )


async def test_a_callback_signed_with_another_token_is_refused(provider: ViberProvider) -> None:
    event = {"event": "delivered", "timestamp": NOW_MS, "message_token": 5}

    with pytest.raises(InvalidSignature):
        await provider.parse_status(signed(event, token="someone-elses-token"))


@pytest.mark.parametrize("signature", [None, "", "deadbeef", "sha256=" + "0" * 64])
async def test_missing_or_forged_signatures_are_refused(
    provider: ViberProvider, signature: str | None
) -> None:
    body = b'{"event": "delivered", "timestamp": 1, "message_token": 5}'
    headers = {"X-Viber-Content-Signature": signature} if signature is not None else {}

    with pytest.raises(InvalidSignature):
        await provider.parse_status(
            ProviderCallback(method="POST", url="https://x/cb", headers=headers, body=body)
        )


async def test_the_signature_may_come_as_the_sig_query_parameter(provider: ViberProvider) -> None:
    body = b'{"event": "delivered", "timestamp": 1, "message_token": 5}'
    signature = hmac.new(AUTH_TOKEN.encode(), body, hashlib.sha256).hexdigest()
    callback = ProviderCallback(
        method="POST",
        url=f"https://x/cb?sig={signature}",
        headers={},
        body=body,
        query={"sig": signature},
    )

    [update] = await provider.parse_status(callback)

    assert update.status is ReceiptStatus.DELIVERED


async def test_the_signature_is_checked_before_the_body_is_read(provider: ViberProvider) -> None:
    with pytest.raises(InvalidSignature):
        await provider.parse_status(
            ProviderCallback(
                method="POST",
                url="https://x/cb",
                headers={"X-Viber-Content-Signature": "0" * 64},
                body=b"not json",
            )
        )


# The rest of the interface


def test_address_is_the_viber_subscriber_id(provider: ViberProvider) -> None:
    assert provider.address(Recipient(viber_id="01234567890A=", phone="+4915112345678")) == (
        "01234567890A="
    )
    assert provider.address(Recipient(phone="+4915112345678")) is None
    assert isinstance(provider, Provider)
    assert provider.channel is Channel.MESSENGER
    assert provider.name == "viber"


@pytest.mark.parametrize(
    "overrides", [{"sender_name": ""}, {"sender_name": "x" * 29}, {"timeout_seconds": 0}]
)
def test_config_is_validated(viber: ViberSimulator, overrides: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        make_config(viber, **overrides)


async def test_a_subscribers_text_message_is_a_reply_keyed_by_its_message_token(
    provider: ViberProvider, viber: ViberSimulator
) -> None:
    payload = viber.message_payload("01234567890A=", "Thanks!", message_token=4912661846655238145)

    contents = await provider.parse_callback(signed(payload))

    assert contents.statuses == []
    assert contents.inbound == [
        InboundMessage(
            channel=Channel.MESSENGER,
            sender="01234567890A=",
            text="Thanks!",
            event_id="4912661846655238145",
            sent_at=datetime.fromtimestamp(NOW_MS / 1000, UTC),
        )
    ]
    assert await provider.parse_inbound(signed(payload)) == contents.inbound


async def test_a_picture_from_a_subscriber_is_no_reply(
    provider: ViberProvider, viber: ViberSimulator
) -> None:
    payload = viber.message_payload("01234567890A=", "ignored")
    payload["message"] = {"type": "picture", "media": "https://example.com/p.jpg"}

    assert await provider.parse_inbound(signed(payload)) == []


async def test_a_message_signed_with_another_token_is_refused(
    provider: ViberProvider, viber: ViberSimulator
) -> None:
    forged = signed(viber.message_payload("01234567890A=", "STOP"), token="not-the-token")

    with pytest.raises(InvalidSignature):
        await provider.parse_inbound(forged)
