"""WhatsApp Cloud API adapter, spoken to over real HTTP through the simulator."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx2
import orjson
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
    ReportedPrice,
    StatusUpdate,
    TransientProviderError,
)
from providers.whatsapp import WhatsAppConfig, WhatsAppProvider, _Pricing
from tests.simulators.whatsapp import (
    RecordedRequest,
    SentWebhook,
    WebhookReceiver,
    WhatsAppSimulator,
    sign,
)

NOW = 1_750_857_384
VERIFY_TOKEN = "sim-verify-token"


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
async def sim(receiver: WebhookReceiver) -> AsyncIterator[WhatsAppSimulator]:
    async with WhatsAppSimulator(webhook_url=receiver.url, clock=lambda: NOW) as sim:
        yield sim


def config_for(sim: WhatsAppSimulator, **overrides: object) -> WhatsAppConfig:
    values: dict[str, object] = {
        "base_url": sim.base_url,
        "phone_number_id": sim.phone_number_id,
        "access_token": sim.access_token,
        "app_secret": sim.app_secret,
        "verify_token": VERIFY_TOKEN,
    }
    return WhatsAppConfig.model_validate(values | overrides)


@pytest.fixture
async def provider(sim: WhatsAppSimulator) -> AsyncIterator[WhatsAppProvider]:
    provider = WhatsAppProvider(config_for(sim))
    yield provider
    await provider.aclose()


def outbound(address: str, text: str | None = "Your code is 123456") -> OutboundMessage:
    return OutboundMessage(
        message_id=f"msg_{uuid.uuid4().hex}",
        attempt_id=f"att_{uuid.uuid4().hex}",
        category=Category.TRANSACTIONAL,
        channel=Channel.MESSENGER,
        address=address,
        content=Content(text=text),
        timeout_seconds=60,
    )


def as_callback(request: RecordedRequest) -> ProviderCallback:
    return ProviderCallback(
        method=request.method,
        url=f"http://127.0.0.1{request.path}",
        headers=request.headers,
        body=request.body,
        query=request.query,
    )


async def send_and_collect(
    provider: WhatsAppProvider,
    sim: WhatsAppSimulator,
    receiver: WebhookReceiver,
    address: str,
) -> tuple[OutboundMessage, str, list[StatusUpdate]]:
    """Send, wait for the simulator's webhooks, parse what our endpoint received."""
    message = outbound(address)
    result = await provider.send(message)
    assert isinstance(result, Accepted)
    await sim.settle()
    received = [r for r in receiver.requests if result.provider_message_id.encode() in r.body]
    updates = [u for r in received for u in await provider.parse_status(as_callback(r))]
    return message, result.provider_message_id, updates


def last_webhook_for(sim: WhatsAppSimulator, wamid: str) -> SentWebhook:
    return [w for w in sim.webhooks if wamid.encode() in w.body][-1]


# --- sending ---------------------------------------------------------------------------


def test_the_provider_is_a_messenger_provider(provider: WhatsAppProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.name == "whatsapp"
    assert provider.channel is Channel.MESSENGER


def test_the_address_is_the_recipients_whatsapp_number(provider: WhatsAppProvider) -> None:
    assert provider.address(Recipient(whatsapp="+4915112345678", phone="+49301234")) == (
        "+4915112345678"
    )
    assert provider.address(Recipient(phone="+4915112345678")) is None


async def test_a_text_message_is_accepted_with_its_wamid(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    message = outbound("+4915112345678", "Hello from Cascade")

    result = await provider.send(message)

    assert isinstance(result, Accepted)
    assert result.provider_message_id.startswith("wamid.")
    request = sim.requests[-1]
    assert request.path == f"/v21.0/{sim.phone_number_id}/messages"
    assert request.headers["authorization"] == f"Bearer {sim.access_token}"
    assert request.json() == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "4915112345678",
        "type": "text",
        "text": {"body": "Hello from Cascade"},
        "biz_opaque_callback_data": message.attempt_id,
    }


async def test_a_configured_template_is_sent_with_the_text_as_body_parameter(
    sim: WhatsAppSimulator,
) -> None:
    provider = WhatsAppProvider(config_for(sim, template_name="otp_code", template_language="de"))
    message = outbound("+4915112345678", "123456")

    result = await provider.send(message)
    await provider.aclose()

    assert isinstance(result, Accepted)
    body = sim.requests[-1].json()
    assert body["type"] == "template"
    assert body["template"] == {
        "name": "otp_code",
        "language": {"code": "de"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "123456"}]}],
    }
    assert body["biz_opaque_callback_data"] == message.attempt_id


@pytest.mark.parametrize(
    ("address", "code"),
    [
        ("+4915100000026", "whatsapp:131026"),  # undeliverable
        ("+4915100000047", "whatsapp:131047"),  # 24 h window closed
    ],
)
async def test_recipient_errors_are_permanent_rejections(
    provider: WhatsAppProvider, address: str, code: str
) -> None:
    result = await provider.send(outbound(address))

    assert isinstance(result, Rejected)
    assert result.code == code
    assert result.detail


async def test_a_message_without_text_is_rejected_before_calling_the_api(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    before = len(sim.requests)

    result = await provider.send(outbound("+4915112345678", text=None))

    assert result == Rejected("whatsapp:empty_body", "a text message needs content.text")
    assert len(sim.requests) == before


async def test_the_throughput_limit_is_transient_and_the_providers_fault(
    provider: WhatsAppProvider,
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("+4915100000029"))

    assert raised.value.code == "whatsapp:130429"
    assert raised.value.provider_fault is True


async def test_the_pair_rate_limit_is_transient_but_not_the_providers_fault(
    provider: WhatsAppProvider,
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("+4915100000056"))

    assert raised.value.code == "whatsapp:131056"
    assert raised.value.provider_fault is False


@pytest.mark.parametrize(
    ("address", "code"),
    [("+4915100000000", "whatsapp:131000"), ("+4915100000002", "whatsapp:2")],
)
async def test_server_errors_are_transient(
    provider: WhatsAppProvider, address: str, code: str
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound(address))

    assert raised.value.code == code
    assert raised.value.provider_fault is True


async def test_a_bad_access_token_is_a_transient_provider_fault(sim: WhatsAppSimulator) -> None:
    provider = WhatsAppProvider(config_for(sim, access_token="expired"))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("+4915112345678"))
    await provider.aclose()

    assert raised.value.code == "whatsapp:190"
    assert raised.value.provider_fault is True
    assert sim.requests[-1].headers["authorization"] == "Bearer expired"


async def test_a_wrong_phone_number_id_is_a_provider_fault_not_a_rejection(
    sim: WhatsAppSimulator,
) -> None:
    provider = WhatsAppProvider(config_for(sim, phone_number_id="999"))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("+4915112345678"))
    await provider.aclose()

    assert raised.value.code == "whatsapp:100"
    assert raised.value.provider_fault is True


async def test_an_unreachable_api_is_transient(sim: WhatsAppSimulator) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    provider = WhatsAppProvider(config_for(sim, base_url=f"http://127.0.0.1:{closed_port}"))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(outbound("+4915112345678"))
    await provider.aclose()

    assert raised.value.code == "whatsapp:transport"
    assert raised.value.provider_fault is True


async def test_a_borrowed_http_client_is_left_open(sim: WhatsAppSimulator) -> None:
    async with httpx2.AsyncClient() as http:
        provider = WhatsAppProvider(config_for(sim), http=http)
        await provider.aclose()

        assert isinstance(await provider.send(outbound("+4915112345678")), Accepted)


# --- status webhooks -------------------------------------------------------------------


async def test_sent_then_delivered_webhooks_match_the_attempt(
    provider: WhatsAppProvider, sim: WhatsAppSimulator, receiver: WebhookReceiver
) -> None:
    message, wamid, updates = await send_and_collect(provider, sim, receiver, "+4915112345678")

    at = datetime.fromtimestamp(NOW, tz=UTC)
    assert updates == [
        StatusUpdate(
            status=ReceiptStatus.SENT,
            event_id=f"{wamid}:sent",
            provider_message_id=wamid,
            attempt_id=message.attempt_id,
            occurred_at=at,
            price=ReportedPrice(category="utility"),  # the webhook's `pricing`
        ),
        StatusUpdate(
            status=ReceiptStatus.DELIVERED,
            event_id=f"{wamid}:delivered",
            provider_message_id=wamid,
            attempt_id=message.attempt_id,
            occurred_at=at,
            price=ReportedPrice(category="utility"),
        ),
    ]


def test_free_pricing_reads_as_not_billable() -> None:
    assert _Pricing(billable=False, category="service").reported() == ReportedPrice(
        billable=False, category="service"
    )
    free_entry = _Pricing(category="marketing", type="free_entry_point").reported()
    assert free_entry.billable is False


async def test_a_failed_webhook_carries_the_error_code(
    provider: WhatsAppProvider, sim: WhatsAppSimulator, receiver: WebhookReceiver
) -> None:
    message, wamid, updates = await send_and_collect(provider, sim, receiver, "+4915100000044")

    [update] = updates
    assert update.status is ReceiptStatus.FAILED
    assert update.attempt_id == message.attempt_id
    assert update.provider_message_id == wamid
    # The same code, in the same form, as a send refused for that reason.
    assert update.error_code == "whatsapp:131026"
    assert update.error_detail == "Message undeliverable"


async def test_a_failed_webhook_without_errors_still_has_a_whatsapp_code(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    payload = sim.status_payload("wamid.NOREASON", "4915112345678", "failed")
    del payload["entry"][0]["changes"][0]["value"]["statuses"][0]["errors"]
    body = orjson.dumps(payload)
    headers = {"x-hub-signature-256": sign(sim.app_secret, body)}

    [update] = await provider.parse_status(ProviderCallback("POST", sim.base_url, headers, body))

    assert (update.status, update.error_code) == (ReceiptStatus.FAILED, "whatsapp:failed")


async def test_read_may_arrive_without_delivered(
    provider: WhatsAppProvider, sim: WhatsAppSimulator, receiver: WebhookReceiver
) -> None:
    _, _, updates = await send_and_collect(provider, sim, receiver, "+4915100000088")

    assert [u.status for u in updates] == [ReceiptStatus.SENT, ReceiptStatus.READ]


async def test_a_blocked_user_leaves_the_message_at_sent(
    provider: WhatsAppProvider, sim: WhatsAppSimulator, receiver: WebhookReceiver
) -> None:
    _, _, updates = await send_and_collect(provider, sim, receiver, "+4915100000077")

    assert [u.status for u in updates] == [ReceiptStatus.SENT]


async def test_a_tampered_body_is_refused(
    provider: WhatsAppProvider, sim: WhatsAppSimulator, receiver: WebhookReceiver
) -> None:
    _, wamid, _ = await send_and_collect(provider, sim, receiver, "+4915112345678")
    webhook = last_webhook_for(sim, wamid)
    tampered = webhook.body.replace(b'"delivered"', b'"read"')
    assert tampered != webhook.body

    with pytest.raises(InvalidSignature):
        await provider.parse_status(
            ProviderCallback("POST", webhook.url, webhook.headers, tampered)
        )


async def test_a_signature_made_with_another_secret_is_refused(
    sim: WhatsAppSimulator,
) -> None:
    provider = WhatsAppProvider(config_for(sim, app_secret="someone-elses-secret"))
    payload = sim.status_payload("wamid.X", "4915112345678", "delivered")
    webhook = await sim.post_webhook(payload)

    with pytest.raises(InvalidSignature):
        await provider.parse_status(
            ProviderCallback("POST", webhook.url, webhook.headers, webhook.body)
        )
    await provider.aclose()


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Hub-Signature-256": "deadbeef"}, {"X-Hub-Signature-256": "sha256=ünïcode"}],
)
async def test_a_missing_or_malformed_signature_is_refused(
    provider: WhatsAppProvider, sim: WhatsAppSimulator, headers: dict[str, str]
) -> None:
    body = b'{"object":"whatsapp_business_account","entry":[]}'

    with pytest.raises(InvalidSignature):
        await provider.parse_status(ProviderCallback("POST", sim.base_url, headers, body))


async def test_the_signature_header_name_is_case_insensitive(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    body = b'{"object":"whatsapp_business_account","entry":[]}'
    headers = {"X-Hub-Signature-256": sign(sim.app_secret, body)}

    assert await provider.parse_status(ProviderCallback("POST", sim.base_url, headers, body)) == []


async def test_inbound_user_messages_carry_no_status_updates(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    webhook = await sim.post_webhook(sim.inbound_text_payload("4915112345678", "Hi there"))

    assert webhook.status_code == 200
    callback = ProviderCallback("POST", webhook.url, webhook.headers, webhook.body)
    assert await provider.parse_status(callback) == []


async def test_a_user_text_message_is_a_reply_from_an_e164_number(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    payload = sim.inbound_text_payload("4915112345678", "Hi there")
    value = payload["entry"][0]["changes"][0]["value"]
    image = {**value["messages"][0], "id": "wamid.image", "type": "image", "image": {"id": "1"}}
    del image["text"]
    value["messages"].append(image)  # media is no text reply: skipped
    webhook = await sim.post_webhook(payload)

    callback = ProviderCallback("POST", webhook.url, webhook.headers, webhook.body)
    contents = await provider.parse_callback(callback)

    [message] = value["messages"][:1]
    assert contents.statuses == []
    assert contents.inbound == [
        InboundMessage(
            channel=Channel.MESSENGER,
            sender="+4915112345678",
            text="Hi there",
            event_id=message["id"],
            sent_at=datetime.fromtimestamp(int(message["timestamp"]), tz=UTC),
            to="+" + sim.display_phone_number,
        )
    ]
    assert await provider.parse_inbound(callback) == contents.inbound


async def test_a_forged_user_message_is_refused(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    body = orjson.dumps(sim.inbound_text_payload("4915112345678", "STOP"))
    headers = {"x-hub-signature-256": sign("not-the-app-secret", body)}

    with pytest.raises(InvalidSignature):
        await provider.parse_inbound(ProviderCallback("POST", sim.base_url, headers, body))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"object":"page","entry":[]}',
        b'{"object":"whatsapp_business_account","entry":[{"id":"1","changes":'
        b'[{"field":"messages","value":{"statuses":[{"id":"wamid.X","status":"sent"}]}}]}]}',
    ],
)
async def test_a_signed_but_unreadable_payload_is_malformed(
    provider: WhatsAppProvider, sim: WhatsAppSimulator, body: bytes
) -> None:
    headers = {"x-hub-signature-256": sign(sim.app_secret, body)}

    with pytest.raises(MalformedCallback):
        await provider.parse_status(ProviderCallback("POST", sim.base_url, headers, body))


# --- subscription handshake ------------------------------------------------------------


async def test_the_handshake_echoes_the_challenge_only_for_the_right_verify_token(
    provider: WhatsAppProvider, sim: WhatsAppSimulator
) -> None:
    async def endpoint(request: RecordedRequest) -> tuple[int, str]:
        challenge = provider.verify_subscription(request.query)
        return (200, challenge) if challenge is not None else (403, "")

    async with WebhookReceiver(handler=endpoint) as our_endpoint:
        assert await sim.verify_webhook(our_endpoint.url, VERIFY_TOKEN) is True
        assert await sim.verify_webhook(our_endpoint.url, "guessed-token") is False
        assert await sim.verify_webhook(our_endpoint.url, "") is False


@pytest.mark.parametrize(
    "query",
    [
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "42"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
        {"hub.mode": "subscribe", "hub.challenge": "42"},
        {},
    ],
)
def test_the_handshake_refuses_incomplete_requests(
    provider: WhatsAppProvider, query: dict[str, str]
) -> None:
    assert provider.verify_subscription(query) is None
