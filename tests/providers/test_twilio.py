"""Twilio SMS adapter, against the Twilio simulator over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import socket
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import urlencode

import httpx2
import pydantic
import pytest
from twilio.request_validator import RequestValidator

from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
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
from providers.twilio import TwilioConfig, TwilioProvider, classify_send_response
from tests.simulators.twilio import (
    CallbackReceiver,
    ReceivedCallback,
    SimulatedNumber,
    TwilioSimulator,
)

ACCOUNT_SID = "AC" + "ab" * 16
AUTH_TOKEN = "12345678901234567890123456789012"
FROM_NUMBER = "+15557654321"
SERVICE_SID = "MG" + "cd" * 16
CALLBACK_URL = "https://cascade.example.com/v1/providers/twilio/status?attempt=att-1"


@pytest.fixture(scope="module")
async def running_twilio() -> AsyncIterator[TwilioSimulator]:
    async with TwilioSimulator(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN) as simulator:
        yield simulator


@pytest.fixture(scope="module")
async def running_receiver() -> AsyncIterator[CallbackReceiver]:
    async with CallbackReceiver() as callback_receiver:
        yield callback_receiver


@pytest.fixture
def twilio(running_twilio: TwilioSimulator) -> TwilioSimulator:
    running_twilio.reset()
    return running_twilio


@pytest.fixture
def receiver(running_receiver: CallbackReceiver) -> CallbackReceiver:
    running_receiver.reset()
    return running_receiver


def make_config(twilio: TwilioSimulator, **overrides: object) -> TwilioConfig:
    fields: dict[str, object] = {
        "base_url": twilio.base_url,
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from_number": FROM_NUMBER,
        "timeout_seconds": 2.0,
    }
    return TwilioConfig.model_validate(fields | overrides)


@pytest.fixture
async def provider(twilio: TwilioSimulator) -> AsyncIterator[TwilioProvider]:
    adapter = TwilioProvider(make_config(twilio))
    yield adapter
    await adapter.aclose()


def sms(
    to: str,
    *,
    text: str | None = "Your code is 123456",
    timeout_seconds: int = 120,
    status_callback_url: str | None = None,
) -> OutboundMessage:
    return OutboundMessage(
        message_id="msg-1",
        attempt_id="att-1",
        category=Category.TRANSACTIONAL,
        channel=Channel.SMS,
        address=to,
        content=Content(text=text),
        timeout_seconds=timeout_seconds,
        status_callback_url=status_callback_url,
    )


def as_callback(received: ReceivedCallback) -> ProviderCallback:
    return ProviderCallback(
        method=received.method,
        url=received.url,
        headers=received.headers,
        body=received.body,
        query=received.query,
    )


def signed_callback(
    params: Mapping[str, str],
    *,
    url: str = CALLBACK_URL,
    token: str = AUTH_TOKEN,
    extra_headers: Mapping[str, str] | None = None,
) -> ProviderCallback:
    """A StatusCallback signed by Twilio's own SDK."""
    signature = RequestValidator(token).compute_signature(url, dict(params))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature,
        **(extra_headers or {}),
    }
    return ProviderCallback(
        method="POST", url=url, headers=headers, body=urlencode(params).encode()
    )


def status_params(status: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "From": FROM_NUMBER,
        "MessageSid": "SM" + "ef" * 16,
        "MessageStatus": status,
        "SmsSid": "SM" + "ef" * 16,
        "SmsStatus": status,
        "To": SimulatedNumber.DELIVERED,
        **extra,
    }


async def deliver_and_collect(
    provider: TwilioProvider, twilio: TwilioSimulator, receiver: CallbackReceiver, to: str
) -> tuple[Accepted, list[ReceivedCallback]]:
    callback_url = receiver.url_for("/v1/providers/twilio/status?attempt=att-1")
    result = await provider.send(sms(to, status_callback_url=callback_url))
    assert isinstance(result, Accepted)
    await twilio.wait_for_status_reports()
    return result, receiver.received


# Sending


async def test_accepted_send_returns_the_message_sid(
    provider: TwilioProvider, twilio: TwilioSimulator
) -> None:
    result = await provider.send(sms(SimulatedNumber.DELIVERED))

    assert isinstance(result, Accepted)
    assert result.provider_message_id.startswith("SM")
    assert result.provider_message_id in twilio.messages


async def test_send_posts_twilio_form_fields_with_basic_auth(
    provider: TwilioProvider, twilio: TwilioSimulator, receiver: CallbackReceiver
) -> None:
    callback_url = receiver.url_for("/v1/providers/twilio/status?attempt=att-1")
    await provider.send(sms(SimulatedNumber.DELIVERED, status_callback_url=callback_url))

    [submit] = twilio.message_submits
    assert submit.method == "POST"
    assert submit.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert submit.basic_auth == (ACCOUNT_SID, AUTH_TOKEN)
    assert submit.headers["content-type"] == "application/x-www-form-urlencoded"
    assert submit.form == {
        "To": SimulatedNumber.DELIVERED,
        "From": FROM_NUMBER,
        "Body": "Your code is 123456",
        "StatusCallback": callback_url,
        "ValidityPeriod": "120",
    }


async def test_send_through_a_messaging_service_names_the_service_instead_of_a_number(
    twilio: TwilioSimulator,
) -> None:
    config = make_config(twilio, from_number=None, messaging_service_sid=SERVICE_SID)
    adapter = TwilioProvider(config)
    try:
        result = await adapter.send(sms(SimulatedNumber.DELIVERED))
    finally:
        await adapter.aclose()

    assert isinstance(result, Accepted)
    [submit] = twilio.message_submits
    assert submit.form["MessagingServiceSid"] == SERVICE_SID
    assert "From" not in submit.form


@pytest.mark.parametrize(
    ("step_timeout", "validity_period"),
    [(60, "60"), (36_000, "36000"), (86_400, "36000")],
)
async def test_validity_period_is_the_step_timeout_capped_at_twilios_ten_hours(
    provider: TwilioProvider, twilio: TwilioSimulator, step_timeout: int, validity_period: str
) -> None:
    await provider.send(sms(SimulatedNumber.DELIVERED, timeout_seconds=step_timeout))

    [submit] = twilio.message_submits
    assert submit.form["ValidityPeriod"] == validity_period


async def test_status_callback_is_omitted_when_the_message_has_none(
    provider: TwilioProvider, twilio: TwilioSimulator
) -> None:
    await provider.send(sms(SimulatedNumber.DELIVERED))

    [submit] = twilio.message_submits
    assert "StatusCallback" not in submit.form


@pytest.mark.parametrize(
    ("to", "code"),
    [
        (SimulatedNumber.INVALID_NUMBER, "twilio:21211"),
        (SimulatedNumber.UNSUBSCRIBED, "twilio:21610"),
        (SimulatedNumber.NOT_MOBILE, "twilio:21614"),
        ("015551234", "twilio:21211"),  # not E.164
    ],
)
async def test_recipient_errors_are_rejected_with_the_twilio_code(
    provider: TwilioProvider, to: str, code: str
) -> None:
    result = await provider.send(sms(to))

    assert isinstance(result, Rejected)
    assert result.code == code
    assert result.detail


async def test_sms_without_text_is_rejected_without_calling_twilio(
    provider: TwilioProvider, twilio: TwilioSimulator
) -> None:
    result = await provider.send(sms(SimulatedNumber.DELIVERED, text=None))

    assert result == Rejected(code="twilio:missing_body", detail="SMS needs content.text")
    assert twilio.message_submits == []


async def test_rate_limit_is_transient_and_honours_retry_after(
    provider: TwilioProvider, twilio: TwilioSimulator
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(sms(SimulatedNumber.RATE_LIMITED))

    assert raised.value.code == "twilio:20429"
    assert raised.value.retry_after == twilio.retry_after_seconds
    assert len(twilio.message_submits) == 1  # the adapter does not retry by itself


async def test_server_error_is_transient(provider: TwilioProvider) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(sms(SimulatedNumber.SERVER_ERROR))

    assert raised.value.code == "twilio:20500"
    assert raised.value.provider_fault


async def test_wrong_credentials_are_a_transient_provider_fault(twilio: TwilioSimulator) -> None:
    adapter = TwilioProvider(make_config(twilio, auth_token="not-the-token"))
    try:
        with pytest.raises(TransientProviderError) as raised:
            await adapter.send(sms(SimulatedNumber.DELIVERED))
    finally:
        await adapter.aclose()

    assert raised.value.code == "twilio:auth"
    assert raised.value.provider_fault
    assert twilio.messages == {}


async def test_slow_answer_is_a_transient_timeout(twilio: TwilioSimulator) -> None:
    adapter = TwilioProvider(make_config(twilio, timeout_seconds=0.2))
    try:
        with pytest.raises(TransientProviderError) as raised:
            await adapter.send(sms(SimulatedNumber.SLOW))
    finally:
        await adapter.aclose()

    assert raised.value.code == "twilio:timeout"


async def test_unreachable_twilio_is_transient(twilio: TwilioSimulator) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    config = make_config(twilio, base_url=f"http://127.0.0.1:{closed_port}")
    adapter = TwilioProvider(config)
    try:
        with pytest.raises(TransientProviderError) as raised:
            await adapter.send(sms(SimulatedNumber.DELIVERED))
    finally:
        await adapter.aclose()

    assert raised.value.code == "twilio:transport"


async def test_a_shared_http_client_is_left_open(twilio: TwilioSimulator) -> None:
    async with httpx2.AsyncClient() as http:
        adapter = TwilioProvider(make_config(twilio), http=http)
        assert isinstance(await adapter.send(sms(SimulatedNumber.DELIVERED)), Accepted)
        await adapter.aclose()

        assert not http.is_closed


def twilio_answer(
    http_status: int, /, headers: Mapping[str, str] | None = None, **body: object
) -> httpx2.Response:
    """An answer in Twilio's error shape, for the classification rules the simulator never hits."""
    return httpx2.Response(http_status, headers=headers, json=body)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("7", 7.0), ("-3", 0.0), ("inf", None), ("soon", None)],
)
def test_retry_after_in_seconds_is_honoured_when_sensible(
    retry_after: str, expected: float | None
) -> None:
    answer = twilio_answer(429, {"Retry-After": retry_after}, code=20429, message="Too Many")

    with pytest.raises(TransientProviderError) as raised:
        classify_send_response(answer)

    assert raised.value.retry_after == expected


def test_retry_after_as_an_http_date_is_honoured() -> None:
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    answer = twilio_answer(503, {"Retry-After": in_a_minute}, code=20503, message="Unavailable")

    with pytest.raises(TransientProviderError) as raised:
        classify_send_response(answer)

    assert raised.value.retry_after is not None
    assert 50 <= raised.value.retry_after <= 60


def test_full_sender_queue_is_transient_not_the_recipients_fault() -> None:
    answer = twilio_answer(400, code=21611, message="queue full", status=400)

    with pytest.raises(TransientProviderError) as raised:
        classify_send_response(answer)

    assert raised.value.code == "twilio:21611"
    assert raised.value.provider_fault


def test_unknown_client_error_is_rejected_with_its_code() -> None:
    answer = twilio_answer(404, code=20404, message="not found", status=404)

    assert classify_send_response(answer) == Rejected(code="twilio:20404", detail="not found")


def test_success_without_a_message_sid_is_a_transient_provider_fault() -> None:
    with pytest.raises(TransientProviderError) as raised:
        classify_send_response(httpx2.Response(201, text="<html>proxy</html>"))

    assert raised.value.code == "twilio:bad_response"


# Status callbacks


async def test_delivered_sms_reports_sent_then_delivered_for_the_attempt(
    provider: TwilioProvider, twilio: TwilioSimulator, receiver: CallbackReceiver
) -> None:
    accepted, callbacks = await deliver_and_collect(
        provider, twilio, receiver, SimulatedNumber.DELIVERED
    )

    updates = [u for c in callbacks for u in await provider.parse_status(as_callback(c))]
    assert [u.status for u in updates] == [ReceiptStatus.SENT, ReceiptStatus.DELIVERED]
    assert {u.provider_message_id for u in updates} == {accepted.provider_message_id}
    assert {u.attempt_id for u in updates} == {"att-1"}
    assert [u.event_id for u in updates] == [
        c.headers["i-twilio-idempotency-token"] for c in callbacks
    ]
    assert all(u.error_code is None for u in updates)


async def test_undelivered_sms_reports_failure_with_the_twilio_error_code(
    provider: TwilioProvider, twilio: TwilioSimulator, receiver: CallbackReceiver
) -> None:
    _, callbacks = await deliver_and_collect(
        provider, twilio, receiver, SimulatedNumber.UNDELIVERED
    )

    [sent] = await provider.parse_status(as_callback(callbacks[0]))
    [failed] = await provider.parse_status(as_callback(callbacks[1]))
    assert sent.status is ReceiptStatus.SENT
    assert failed.status is ReceiptStatus.FAILED
    assert failed.error_code == "twilio:30003"
    assert failed.error_detail == "unreachable destination handset"


async def test_carrier_without_receipt_reports_only_sent(
    provider: TwilioProvider, twilio: TwilioSimulator, receiver: CallbackReceiver
) -> None:
    _, callbacks = await deliver_and_collect(
        provider, twilio, receiver, SimulatedNumber.NO_DELIVERY_RECEIPT
    )

    [callback] = callbacks
    [update] = await provider.parse_status(as_callback(callback))
    assert update.status is ReceiptStatus.SENT


async def test_queued_report_from_a_messaging_service_carries_no_update(
    twilio: TwilioSimulator, receiver: CallbackReceiver
) -> None:
    config = make_config(twilio, from_number=None, messaging_service_sid=SERVICE_SID)
    adapter = TwilioProvider(config)
    try:
        _, callbacks = await deliver_and_collect(
            adapter, twilio, receiver, SimulatedNumber.DELIVERED
        )
        results = [await adapter.parse_status(as_callback(c)) for c in callbacks]
    finally:
        await adapter.aclose()

    statuses = [[u.status for u in updates] for updates in results]
    assert statuses == [[], [ReceiptStatus.SENT], [ReceiptStatus.DELIVERED]]


async def test_tampered_callback_body_is_refused(
    provider: TwilioProvider, twilio: TwilioSimulator, receiver: CallbackReceiver
) -> None:
    _, callbacks = await deliver_and_collect(
        provider, twilio, receiver, SimulatedNumber.UNDELIVERED
    )
    genuine = as_callback(callbacks[-1])
    tampered = ProviderCallback(
        method=genuine.method,
        url=genuine.url,
        headers=genuine.headers,
        body=genuine.body.replace(b"MessageStatus=undelivered", b"MessageStatus=delivered"),
    )
    assert tampered.body != genuine.body

    with pytest.raises(InvalidSignature):
        await provider.parse_status(tampered)


async def test_callback_for_another_url_is_refused(provider: TwilioProvider) -> None:
    callback = signed_callback(status_params("delivered"))
    moved = ProviderCallback(
        method="POST",
        url=CALLBACK_URL.replace("att-1", "att-2"),
        headers=callback.headers,
        body=callback.body,
    )

    with pytest.raises(InvalidSignature):
        await provider.parse_status(moved)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Twilio-Signature": ""},
        {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
    ],
    ids=["missing", "empty", "wrong"],
)
async def test_callback_without_a_valid_signature_is_refused(
    provider: TwilioProvider, headers: dict[str, str]
) -> None:
    callback = ProviderCallback(
        method="POST",
        url=CALLBACK_URL,
        headers=headers,
        body=urlencode(status_params("delivered")).encode(),
    )

    with pytest.raises(InvalidSignature):
        await provider.parse_status(callback)


async def test_callback_signed_with_another_accounts_token_is_refused(
    provider: TwilioProvider,
) -> None:
    callback = signed_callback(status_params("delivered"), token="another-accounts-token")

    with pytest.raises(InvalidSignature):
        await provider.parse_status(callback)


async def test_callback_signed_with_a_webhooks_shared_key_is_refused(
    provider: TwilioProvider,
) -> None:
    callback = signed_callback(
        status_params("delivered"),
        extra_headers={"X-Twilio-Webhooks-Signature-Settings": "key=KS1,algorithm=HMAC_SHA256"},
    )

    with pytest.raises(InvalidSignature):
        await provider.parse_status(callback)


@pytest.mark.parametrize(
    "params",
    [
        status_params("delivered"),
        status_params("failed", ErrorCode="30007", Body="Grüße & ünïcödé = ok?"),
        {"MessageSid": "SM1", "MessageStatus": "sent", "a": "", "B": "x y", "b": "+/%"},
    ],
    ids=["plain", "unicode-and-reserved-characters", "case-sensitive-order"],
)
async def test_callback_signed_by_twilios_sdk_verifies(
    provider: TwilioProvider, params: dict[str, str]
) -> None:
    [update] = await provider.parse_status(signed_callback(params))

    assert update.provider_message_id == params["MessageSid"]


async def test_signature_over_the_url_without_its_port_verifies(provider: TwilioProvider) -> None:
    # Twilio sometimes signs the URL without the port the request went to; its SDK accepts both.
    params = status_params("delivered")
    signed_without_port = signed_callback(params, url="https://cascade.example.com/status")
    received_with_port = ProviderCallback(
        method="POST",
        url="https://cascade.example.com:443/status",
        headers=signed_without_port.headers,
        body=signed_without_port.body,
    )

    [update] = await provider.parse_status(received_with_port)
    assert update.status is ReceiptStatus.DELIVERED


async def test_header_names_are_matched_case_insensitively(provider: TwilioProvider) -> None:
    callback = signed_callback(status_params("read"))
    lowercase = ProviderCallback(
        method="POST",
        url=callback.url,
        headers={k.lower(): v for k, v in callback.headers.items()},
        body=callback.body,
    )

    [update] = await provider.parse_status(lowercase)
    assert update.status is ReceiptStatus.READ


async def test_attempt_id_is_read_from_the_query_when_the_url_has_none(
    provider: TwilioProvider,
) -> None:
    callback = signed_callback(status_params("delivered"))
    path_only = ProviderCallback(
        method="POST",
        url=CALLBACK_URL.partition("?")[0],
        headers=callback.headers,
        body=callback.body,
        query={"attempt": "att-1"},
    )

    [update] = await provider.parse_status(path_only)
    assert update.attempt_id == "att-1"


@pytest.mark.parametrize(
    ("twilio_status", "expected"),
    [
        ("sent", StatusUpdate(ReceiptStatus.SENT, "")),
        ("delivered", StatusUpdate(ReceiptStatus.DELIVERED, "")),
        ("read", StatusUpdate(ReceiptStatus.READ, "")),
        ("failed", StatusUpdate(ReceiptStatus.FAILED, "", error_code="twilio:30008")),
        ("undelivered", StatusUpdate(ReceiptStatus.FAILED, "", error_code="twilio:30008")),
        ("queued", None),
        ("accepted", None),
        ("sending", None),
    ],
)
async def test_twilio_message_status_maps_to_a_receipt_status(
    provider: TwilioProvider, twilio_status: str, expected: StatusUpdate | None
) -> None:
    params = status_params(twilio_status, ErrorCode="30008")

    updates = await provider.parse_status(signed_callback(params))

    if expected is None:
        assert updates == []
    else:
        [update] = updates
        assert (update.status, update.error_code) == (expected.status, expected.error_code)
        assert update.attempt_id == "att-1"


async def test_event_id_without_idempotency_token_is_a_stable_digest_per_status(
    provider: TwilioProvider,
) -> None:
    [sent] = await provider.parse_status(signed_callback(status_params("sent")))
    [sent_again] = await provider.parse_status(signed_callback(status_params("sent")))
    [delivered] = await provider.parse_status(signed_callback(status_params("delivered")))

    assert sent.event_id == sent_again.event_id != delivered.event_id
    assert sent.event_id == hashlib.sha256(f"SM{'ef' * 16}:sent".encode()).hexdigest()


@pytest.mark.parametrize("missing", ["MessageSid", "MessageStatus"])
async def test_signed_callback_without_sid_or_status_is_malformed(
    provider: TwilioProvider, missing: str
) -> None:
    params = status_params("delivered")
    del params[missing]

    with pytest.raises(MalformedCallback):
        await provider.parse_status(signed_callback(params))


async def test_undecodable_body_is_refused_as_unsigned(provider: TwilioProvider) -> None:
    signature = base64.b64encode(b"x" * 20).decode()
    callback = ProviderCallback(
        method="POST",
        url=CALLBACK_URL,
        headers={"X-Twilio-Signature": signature},
        body=b"MessageSid=SM1&MessageStatus=%FF",
    )

    with pytest.raises(InvalidSignature):
        await provider.parse_status(callback)


# Configuration and interface


def test_config_needs_a_sender_number_or_messaging_service() -> None:
    with pytest.raises(pydantic.ValidationError, match="from_number or messaging_service_sid"):
        TwilioConfig(account_sid=ACCOUNT_SID, auth_token=pydantic.SecretStr(AUTH_TOKEN))


def test_auth_token_is_kept_out_of_reprs() -> None:
    config = TwilioConfig(
        account_sid=ACCOUNT_SID,
        auth_token=pydantic.SecretStr(AUTH_TOKEN),
        from_number=FROM_NUMBER,
    )

    assert AUTH_TOKEN not in repr(config)


async def test_adapter_is_an_sms_provider_addressed_by_phone(provider: TwilioProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.name == "twilio"
    assert provider.channel is Channel.SMS
    assert provider.address(Recipient(phone="+15551230000")) == "+15551230000"
    assert provider.address(Recipient(email="a@example.com")) is None


async def test_a_send_unanswered_after_it_went_out_may_have_been_sent(
    twilio: TwilioSimulator,
) -> None:
    adapter = TwilioProvider(make_config(twilio, timeout_seconds=0.2))
    try:
        with pytest.raises(TransientProviderError) as slow:
            await adapter.send(sms(SimulatedNumber.SLOW))
    finally:
        await adapter.aclose()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    unreachable = TwilioProvider(make_config(twilio, base_url=f"http://127.0.0.1:{closed_port}"))
    try:
        with pytest.raises(TransientProviderError) as refused:
            await unreachable.send(sms(SimulatedNumber.DELIVERED))
    finally:
        await unreachable.aclose()

    assert slow.value.maybe_sent  # read timeout: Twilio may have created it
    assert not refused.value.maybe_sent  # never connected: safe to send again
