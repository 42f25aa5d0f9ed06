"""Web Push adapter against a push service simulator (that also plays the browser)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator

import httpx2
import jwt
import pydantic
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    MalformedCallback,
    OutboundMessage,
    Provider,
    ProviderCallback,
    Recipient,
    Rejected,
    TransientProviderError,
    WebPushSubscription,
)
from providers.webpush import (
    MAX_PLAINTEXT_OCTETS,
    WebPushConfig,
    WebPushProvider,
    attempt_topic,
    classify_response,
    encrypt_push_message,
    load_vapid_private_key,
)
from tests.simulators.webpush import BrowserSubscription, WebPushSimulator

SUBJECT = "mailto:push-ops@cascade.example"
START = 1_800_000_000.0
TWELVE_HOURS = 12 * 3600


class Clock:
    """Unix seconds shared by the adapter and the push service, moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def raw_private_key(key: ec.EllipticCurvePrivateKey) -> str:
    return b64url(key.private_numbers().private_value.to_bytes(32, "big"))


VAPID_KEY = ec.generate_private_key(ec.SECP256R1())
VAPID_PUBLIC = b64url(
    VAPID_KEY.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
)


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
async def running_push_service(clock: Clock) -> AsyncIterator[WebPushSimulator]:
    async with WebPushSimulator(clock=clock) as simulator:
        yield simulator


@pytest.fixture
def push_service(running_push_service: WebPushSimulator, clock: Clock) -> WebPushSimulator:
    running_push_service.reset()
    clock.now = START
    return running_push_service


def make_config(**overrides: object) -> WebPushConfig:
    fields: dict[str, object] = {
        "vapid_private_key": raw_private_key(VAPID_KEY),
        "vapid_subject": SUBJECT,
        "timeout_seconds": 2,
    }
    return WebPushConfig.model_validate(fields | overrides)


@pytest.fixture
async def provider(clock: Clock) -> AsyncIterator[WebPushProvider]:
    adapter = WebPushProvider(make_config(), clock=clock)
    yield adapter
    await adapter.aclose()


def push(
    subscription: BrowserSubscription | WebPushSubscription | None,
    *,
    text: str = "Your parcel is at the door",
    title: str | None = "Delivery",
    timeout_seconds: int = 90,
    attempt_id: str = "att_01",
    metadata: dict[str, str] | None = None,
    receipt_token: str | None = None,
) -> OutboundMessage:
    web_push = (
        WebPushSubscription(subscription.endpoint, subscription.p256dh, subscription.auth)
        if subscription is not None
        else None
    )
    return OutboundMessage(
        message_id="msg_01",
        attempt_id=attempt_id,
        category=Category.TRANSACTIONAL,
        channel=Channel.PUSH,
        address=web_push.endpoint if web_push else "https://push.example/none",
        content=Content(text=text, title=title),
        timeout_seconds=timeout_seconds,
        metadata=metadata or {},
        web_push=web_push,
        receipt_token=receipt_token,
    )


def vapid_parts(authorization: str) -> dict[str, str]:
    scheme, _, params = authorization.partition(" ")
    assert scheme == "vapid"
    return dict(part.strip().split("=", 1) for part in params.split(","))


# Sending


async def test_the_push_service_decrypts_exactly_the_payload_we_sent(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    browser = push_service.subscribe()

    result = await provider.send(push(browser))

    assert isinstance(result, Accepted)
    assert result.provider_message_id.startswith(f"{push_service.base_url}/m/")
    [delivered] = push_service.delivered
    assert delivered.decrypt_error is None
    assert delivered.json() == {
        "title": "Delivery",
        "body": "Your parcel is at the door",
        "message_id": "msg_01",
        "attempt_id": "att_01",
    }


async def test_the_receipt_token_travels_in_the_payload_for_the_service_worker(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    await provider.send(push(push_service.subscribe(), receipt_token="rct_abc"))

    [delivered] = push_service.delivered
    assert delivered.json()["receipt_token"] == "rct_abc"


async def test_the_request_carries_rfc_8030_headers_and_an_aes128gcm_body(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    browser = push_service.subscribe()

    await provider.send(push(browser, timeout_seconds=90))

    [delivered] = push_service.delivered
    assert delivered.path == browser.endpoint.removeprefix(push_service.base_url)
    assert delivered.headers["ttl"] == "90"  # the step timeout: a late push is dropped
    assert delivered.headers["content-encoding"] == "aes128gcm"
    assert delivered.headers["content-type"] == "application/octet-stream"
    assert delivered.headers["urgency"] == "normal"
    assert delivered.headers["topic"] == attempt_topic("att_01")
    body = delivered.body
    assert int.from_bytes(body[16:20], "big") == 4096  # record size
    assert body[20] == 65  # keyid: an uncompressed P-256 point, our ephemeral key
    ephemeral = body[21:86]
    assert ephemeral[0] == 0x04 and b64url(ephemeral) != VAPID_PUBLIC
    assert len(body) == 86 + len(delivered.plaintext or b"") + 1 + 16  # one record, no padding


async def test_every_push_uses_a_fresh_salt_and_sender_key(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    browser = push_service.subscribe()

    await provider.send(push(browser))
    await provider.send(push(browser))

    first, second = push_service.delivered
    assert first.plaintext == second.plaintext
    assert first.body[:16] != second.body[:16]
    assert first.body[21:86] != second.body[21:86]


async def test_encryption_reproduces_the_rfc_8291_example_byte_for_byte() -> None:
    # RFC 8291 section 5 / appendix A.
    subscription = WebPushSubscription(
        endpoint="https://push.example.net/push/JzLQ3raZJfFBR0aqvOMsLrt54w4rJUsV",
        p256dh="BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        auth="BTBZMqHH6r4Tts7J_aSIgg",
    )
    sender_key = load_vapid_private_key("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")

    body = encrypt_push_message(
        b"When I grow up, I want to be a watermelon",
        subscription,
        sender_key=sender_key,
        salt=unb64url("DGv6ra1nlYgDCS1FRnbzlw"),
    )

    assert b64url(body) == (
        "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
        "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT"
        "pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
    )


async def test_metadata_can_set_topic_and_urgency(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    browser = push_service.subscribe()

    await provider.send(
        push(browser, metadata={"webpush_topic": "order-42", "webpush_urgency": "high"})
    )

    [delivered] = push_service.delivered
    assert delivered.headers["topic"] == "order-42"
    assert delivered.headers["urgency"] == "high"


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ({"webpush_topic": "not a topic!"}, "webpush:invalid_topic"),
        ({"webpush_topic": "x" * 33}, "webpush:invalid_topic"),
        ({"webpush_urgency": "urgent"}, "webpush:invalid_urgency"),
    ],
)
async def test_invalid_topic_or_urgency_is_rejected_without_a_request(
    provider: WebPushProvider,
    push_service: WebPushSimulator,
    metadata: dict[str, str],
    code: str,
) -> None:
    result = await provider.send(push(push_service.subscribe(), metadata=metadata))

    assert isinstance(result, Rejected) and result.code == code
    assert push_service.pushes == []


async def test_config_urgency_is_the_default(push_service: WebPushSimulator, clock: Clock) -> None:
    adapter = WebPushProvider(make_config(urgency="very-low"), clock=clock)
    try:
        await adapter.send(push(push_service.subscribe()))
    finally:
        await adapter.aclose()

    assert push_service.delivered[0].headers["urgency"] == "very-low"


# VAPID


async def test_vapid_jwt_is_signed_for_the_push_service_origin(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    await provider.send(push(push_service.subscribe()))

    [delivered] = push_service.delivered
    # The simulator verified the ES256 signature against k by hand; check the claims too.
    assert delivered.vapid_claims == {
        "aud": push_service.base_url,
        "exp": int(START) + TWELVE_HOURS,
        "sub": SUBJECT,
    }
    assert delivered.vapid_key == VAPID_PUBLIC == provider.application_server_key
    parts = vapid_parts(delivered.headers["authorization"])
    assert (
        jwt.decode(
            parts["t"],
            VAPID_KEY.public_key(),
            algorithms=["ES256"],
            audience=push_service.base_url,
            options={"verify_exp": False},
        )["sub"]
        == SUBJECT
    )
    assert jwt.get_unverified_header(parts["t"])["typ"] == "JWT"


async def test_vapid_jwt_is_cached_per_audience_until_near_expiry(
    provider: WebPushProvider, push_service: WebPushSimulator, clock: Clock
) -> None:
    async with WebPushSimulator(clock=clock) as other_service:
        browser, other_browser = push_service.subscribe(), other_service.subscribe()

        await provider.send(push(browser))
        clock.now += 60
        await provider.send(push(browser))
        await provider.send(push(other_browser))
        first, second = push_service.delivered
        [other] = other_service.delivered

        assert first.headers["authorization"] == second.headers["authorization"]
        assert other.vapid_claims is not None
        assert other.vapid_claims["aud"] == other_service.base_url
        assert other.headers["authorization"] != first.headers["authorization"]

        # Eleven hours on, the twelve-hour token is renewed before it can expire in flight.
        clock.now = START + 11 * 3600 + 1
        await provider.send(push(browser))
        renewed = push_service.delivered[-1]
        assert renewed.headers["authorization"] != first.headers["authorization"]
        assert renewed.vapid_claims is not None
        assert renewed.vapid_claims["exp"] == int(clock.now) + TWELVE_HOURS


async def test_the_vapid_key_can_be_given_as_pem(
    push_service: WebPushSimulator, clock: Clock
) -> None:
    pem = VAPID_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    adapter = WebPushProvider(make_config(vapid_private_key=pem), clock=clock)
    try:
        result = await adapter.send(push(push_service.subscribe()))
    finally:
        await adapter.aclose()

    assert isinstance(result, Accepted)
    assert push_service.delivered[0].vapid_key == VAPID_PUBLIC


async def test_an_expired_vapid_token_is_refused_as_a_provider_fault(
    push_service: WebPushSimulator,
) -> None:
    # Our clock a day behind the push service's: every token we sign is already expired.
    adapter = WebPushProvider(make_config(), clock=lambda: START - 24 * 3600)
    try:
        with pytest.raises(TransientProviderError) as caught:
            await adapter.send(push(push_service.subscribe()))
    finally:
        await adapter.aclose()

    assert caught.value.code == "webpush:401"
    assert caught.value.provider_fault
    assert "expired" in caught.value.detail


async def test_a_subscription_bound_to_another_application_server_key_is_a_provider_fault(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    browser = push_service.subscribe(
        application_server_key=b64url(
            other_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        )
    )

    with pytest.raises(TransientProviderError) as caught:
        await provider.send(push(browser))

    assert caught.value.code == "webpush:403"
    assert caught.value.provider_fault


async def test_a_subscription_bound_to_our_key_is_accepted(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    browser = push_service.subscribe(application_server_key=provider.application_server_key)

    assert isinstance(await provider.send(push(browser)), Accepted)


# Outcomes


@pytest.mark.parametrize("behaviour", ["gone", "missing"])
async def test_a_gone_subscription_is_rejected(
    provider: WebPushProvider, push_service: WebPushSimulator, behaviour: str
) -> None:
    result = await provider.send(push(push_service.subscribe(behaviour=behaviour)))

    assert isinstance(result, Rejected)
    assert result.code == "webpush:gone"
    assert result.detail


@pytest.mark.parametrize(("behaviour", "code"), [("slow-down", "429"), ("broken", "503")])
async def test_throttling_and_outages_are_transient_with_retry_after(
    provider: WebPushProvider, push_service: WebPushSimulator, behaviour: str, code: str
) -> None:
    with pytest.raises(TransientProviderError) as caught:
        await provider.send(push(push_service.subscribe(behaviour=behaviour)))

    assert caught.value.code == f"webpush:{code}"
    assert caught.value.retry_after == 7


async def test_a_payload_too_large_for_one_push_is_rejected_before_sending(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    result = await provider.send(push(push_service.subscribe(), text="x" * 4000))

    assert isinstance(result, Rejected) and result.code == "webpush:payload_too_large"
    assert push_service.pushes == []


async def test_the_largest_payload_that_fits_is_accepted(
    provider: WebPushProvider, push_service: WebPushSimulator
) -> None:
    overhead = len(
        json.dumps(
            {"title": None, "body": "", "message_id": "msg_01", "attempt_id": "att_01"},
            separators=(",", ":"),
        )
    )
    text = "x" * (MAX_PLAINTEXT_OCTETS - overhead)

    result = await provider.send(push(push_service.subscribe(), text=text, title=None))

    assert isinstance(result, Accepted)
    assert len(push_service.delivered[0].body) == 4096


@pytest.mark.parametrize(
    ("p256dh", "auth"),
    [
        ("not base64!", "BTBZMqHH6r4Tts7J_aSIgg"),
        (b64url(b"\x04" + b"\x01" * 64), "BTBZMqHH6r4Tts7J_aSIgg"),  # not on the curve
        ("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcx", "BTBZMqHH6r4Tts7J_aSIgg"),
        (
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
            "c2hvcnQ",
        ),
    ],
)
async def test_a_subscription_with_unusable_keys_is_rejected_without_a_request(
    provider: WebPushProvider, push_service: WebPushSimulator, p256dh: str, auth: str
) -> None:
    endpoint = push_service.subscribe().endpoint
    result = await provider.send(push(WebPushSubscription(endpoint, p256dh, auth)))

    assert isinstance(result, Rejected) and result.code == "webpush:invalid_subscription"
    assert push_service.pushes == []


async def test_a_message_without_a_subscription_is_rejected(provider: WebPushProvider) -> None:
    result = await provider.send(push(None))

    assert isinstance(result, Rejected) and result.code == "webpush:no_subscription"


async def test_an_unreachable_push_service_is_transient(provider: WebPushProvider) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    subscription = WebPushSubscription(
        f"http://127.0.0.1:{closed_port}/push/abc",
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        "BTBZMqHH6r4Tts7J_aSIgg",
    )

    with pytest.raises(TransientProviderError) as caught:
        await provider.send(push(subscription))

    assert caught.value.code == "webpush:transport"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (201, "accepted"),
        (202, "accepted"),
        (404, "webpush:gone"),
        (410, "webpush:gone"),
        (413, "webpush:payload_too_large"),
        (400, "transient"),
        (401, "transient"),
        (403, "transient"),
        (429, "transient"),
        (500, "transient"),
        (502, "transient"),
        (415, "webpush:415"),
    ],
)
def test_status_codes_map_to_outcomes(status: int, outcome: str) -> None:
    response = httpx2.Response(status, json={"message": "why"})

    if outcome == "transient":
        with pytest.raises(TransientProviderError) as caught:
            classify_response(response, fallback_id="digest")
        assert caught.value.code == f"webpush:{status}"
        assert caught.value.provider_fault
        assert caught.value.detail == "why"
        return
    result = classify_response(response, fallback_id="digest")
    if outcome == "accepted":
        assert result == Accepted("digest")  # no Location: a stable digest stands in
    else:
        assert result == Rejected(outcome, "why")


# The rest of the interface


def test_address_is_the_subscription_endpoint(provider: WebPushProvider) -> None:
    subscription = WebPushSubscription("https://push.example/abc", "p", "a")

    assert provider.address(Recipient(web_push=subscription)) == "https://push.example/abc"
    assert provider.address(Recipient(push_token="fcm-token")) is None
    assert isinstance(provider, Provider)
    assert provider.channel is Channel.PUSH
    assert provider.name == "webpush"


async def test_push_services_send_no_callbacks(provider: WebPushProvider) -> None:
    callback = ProviderCallback(method="POST", url="https://x/cb", headers={}, body=b"{}")

    with pytest.raises(MalformedCallback):
        await provider.parse_status(callback)


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"vapid_private_key": "not a key"}, "vapid_private_key is not a P-256 private key"),
        ({"vapid_private_key": b64url(b"\x01" * 31)}, "vapid_private_key is not a P-256"),
        ({"vapid_subject": "ops@example.com"}, "vapid_subject must be a mailto: or https:"),
        ({"urgency": "urgent"}, "urgency"),
    ],
)
def test_config_is_validated_without_echoing_the_key(
    overrides: dict[str, object], complaint: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        make_config(**overrides)

    assert complaint in str(caught.value)
    assert raw_private_key(VAPID_KEY) not in str(caught.value)
