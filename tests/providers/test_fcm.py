"""FcmProvider against the FCM simulator over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    Recipient,
    Rejected,
    TransientProviderError,
)
from providers.fcm import FcmConfig, FcmProvider
from tests.simulators.fcm import FcmSimulator, ServiceAccount

PROJECT_ID = "cascade-test"


class SteppedClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
async def fcm() -> AsyncIterator[FcmSimulator]:
    async with FcmSimulator(project_id=PROJECT_ID, retry_after_seconds=7) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def service_account(fcm: FcmSimulator) -> ServiceAccount:
    account = ServiceAccount.generate(project_id=PROJECT_ID, token_uri=fcm.token_uri)
    fcm.register(account)
    return account


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


def config_for(fcm: FcmSimulator, account: ServiceAccount, **overrides: object) -> FcmConfig:
    fields: dict[str, object] = {
        "base_url": fcm.base_url,
        "project_id": PROJECT_ID,
        "service_account_json": SecretStr(account.to_json()),
    }
    return FcmConfig.model_validate(fields | overrides)


@pytest.fixture
async def provider(
    fcm: FcmSimulator, service_account: ServiceAccount, clock: SteppedClock
) -> AsyncIterator[FcmProvider]:
    fcm.reset()
    provider = FcmProvider(config_for(fcm, service_account), clock=clock)
    yield provider
    await provider.aclose()


def push(
    token: str, *, timeout_seconds: int = 60, content: Content | None = None
) -> OutboundMessage:
    return OutboundMessage(
        message_id="msg-01",
        attempt_id="att-01",
        category=Category.TRANSACTIONAL,
        channel=Channel.PUSH,
        address=token,
        content=content or Content(title="Your code", text="Use 123456 to sign in"),
        timeout_seconds=timeout_seconds,
    )


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_push_is_accepted_with_the_fcm_message_name(
    provider: FcmProvider, fcm: FcmSimulator
) -> None:
    result = await provider.send(push("device-token-ok"))

    assert isinstance(result, Accepted)
    assert result.provider_message_id.startswith(f"projects/{PROJECT_ID}/messages/")
    [sent] = fcm.sends
    assert sent.headers["authorization"].startswith("Bearer ya29.")
    message = sent.body["message"]
    assert message["token"] == "device-token-ok"
    assert message["notification"] == {"title": "Your code", "body": "Use 123456 to sign in"}
    assert message["data"] == {"message_id": "msg-01", "attempt_id": "att-01"}


async def test_the_subject_is_the_title_when_there_is_no_title(
    provider: FcmProvider, fcm: FcmSimulator
) -> None:
    await provider.send(push("device-token-ok", content=Content(subject="Hello", text="Hi")))

    assert fcm.sends[0].body["message"]["notification"] == {"title": "Hello", "body": "Hi"}


async def test_the_provider_side_ttl_is_the_step_timeout(
    provider: FcmProvider, fcm: FcmSimulator
) -> None:
    before = int(time.time())
    await provider.send(push("device-token-ok", timeout_seconds=45))
    after = int(time.time())

    message = fcm.sends[0].body["message"]
    assert message["android"]["ttl"] == "45s"
    assert before + 45 <= int(message["apns"]["headers"]["apns-expiration"]) <= after + 45
    assert message["webpush"]["headers"]["TTL"] == "45"


async def test_the_access_token_is_granted_once_and_reused_across_sends(
    provider: FcmProvider, fcm: FcmSimulator
) -> None:
    for _ in range(3):
        assert isinstance(await provider.send(push("device-token-ok")), Accepted)

    assert fcm.token_grants == 1
    assert len({sent.headers["authorization"] for sent in fcm.sends}) == 1


async def test_concurrent_sends_share_one_token_grant(
    provider: FcmProvider, fcm: FcmSimulator
) -> None:
    results = await asyncio.gather(*(provider.send(push(f"device-{i}")) for i in range(5)))

    assert all(isinstance(result, Accepted) for result in results)
    assert fcm.token_grants == 1


async def test_the_access_token_is_refreshed_shortly_before_it_expires(
    provider: FcmProvider, fcm: FcmSimulator, clock: SteppedClock
) -> None:
    await provider.send(push("device-token-ok"))
    clock.advance(3000)
    await provider.send(push("device-token-ok"))
    assert fcm.token_grants == 1

    clock.advance(599 - 30)  # 30 s before the 3599 s lifetime ends
    await provider.send(push("device-token-ok"))

    assert fcm.token_grants == 2
    assert fcm.sends[1].headers["authorization"] != fcm.sends[2].headers["authorization"]


async def test_a_token_refused_with_401_is_replaced_once_and_the_send_retried(
    provider: FcmProvider, fcm: FcmSimulator
) -> None:
    await provider.send(push("device-token-ok"))
    fcm.revoke_access_tokens()

    result = await provider.send(push("device-token-ok"))

    assert isinstance(result, Accepted)
    assert fcm.token_grants == 2
    assert [sent.status_code for sent in fcm.sends] == [200, 401, 200]


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("device-unregistered", "fcm:UNREGISTERED"),
        ("device-invalid", "fcm:INVALID_ARGUMENT"),
        ("device-senderid", "fcm:SENDER_ID_MISMATCH"),
    ],
)
async def test_a_dead_or_foreign_token_is_rejected_for_good(
    provider: FcmProvider, token: str, code: str
) -> None:
    result = await provider.send(push(token))

    assert isinstance(result, Rejected)
    assert result.code == code
    assert result.detail


@pytest.mark.parametrize(
    ("token", "code", "retry_after"),
    [
        ("device-quota", "fcm:QUOTA_EXCEEDED", 7.0),
        ("device-unavailable", "fcm:UNAVAILABLE", 7.0),
        ("device-internal", "fcm:INTERNAL", None),
    ],
)
async def test_overload_and_outages_are_transient_and_honour_retry_after(
    provider: FcmProvider, token: str, code: str, retry_after: float | None
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(push(token))

    assert raised.value.code == code
    assert raised.value.retry_after == retry_after
    assert raised.value.provider_fault is True


async def test_a_third_party_auth_error_is_a_provider_fault_without_a_new_grant(
    provider: FcmProvider, fcm: FcmSimulator
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(push("device-thirdpartyauth"))

    assert raised.value.code == "fcm:THIRD_PARTY_AUTH_ERROR"
    assert raised.value.provider_fault is True
    assert fcm.token_grants == 1
    assert len(fcm.sends) == 1


async def test_an_unreachable_fcm_endpoint_is_transient(
    fcm: FcmSimulator, service_account: ServiceAccount
) -> None:
    provider = FcmProvider(
        config_for(fcm, service_account, base_url=f"http://127.0.0.1:{closed_port()}")
    )
    try:
        with pytest.raises(TransientProviderError) as raised:
            await provider.send(push("device-token-ok"))
    finally:
        await provider.aclose()

    assert raised.value.code == "fcm:transport"
    assert raised.value.provider_fault is True


async def test_an_unreachable_token_server_is_transient(
    fcm: FcmSimulator, service_account: ServiceAccount
) -> None:
    provider = FcmProvider(
        config_for(fcm, service_account, token_uri=f"http://127.0.0.1:{closed_port()}/token")
    )
    try:
        with pytest.raises(TransientProviderError) as raised:
            await provider.send(push("device-token-ok"))
    finally:
        await provider.aclose()

    assert raised.value.code == "fcm:token_transport"


async def test_a_grant_signed_with_the_wrong_key_is_a_transient_provider_fault(
    fcm: FcmSimulator, service_account: ServiceAccount
) -> None:
    fcm.reset()
    other_key = ServiceAccount.generate(project_id=PROJECT_ID, token_uri=fcm.token_uri)
    forged = ServiceAccount(
        **{**vars(service_account), "private_key_pem": other_key.private_key_pem}
    )
    provider = FcmProvider(config_for(fcm, forged))
    try:
        with pytest.raises(TransientProviderError) as raised:
            await provider.send(push("device-token-ok"))
    finally:
        await provider.aclose()

    assert raised.value.code == "fcm:token:invalid_grant"
    assert raised.value.provider_fault is True
    assert fcm.refused_grants == ["Invalid JWT: Signature verification failed"]
    assert fcm.sends == []


async def test_the_token_uri_override_is_both_the_grant_url_and_the_audience(
    fcm: FcmSimulator, service_account: ServiceAccount
) -> None:
    fcm.reset()
    google_key = ServiceAccount(
        **{**vars(service_account), "token_uri": "https://oauth2.googleapis.com/token"}
    )
    provider = FcmProvider(config_for(fcm, google_key, token_uri=fcm.token_uri))
    try:
        assert isinstance(await provider.send(push("device-token-ok")), Accepted)
    finally:
        await provider.aclose()

    assert fcm.token_grants == 1
    assert fcm.refused_grants == []


async def test_the_service_account_can_come_from_a_key_file(
    fcm: FcmSimulator, service_account: ServiceAccount, tmp_path: Path
) -> None:
    key_file = tmp_path / "service-account.json"
    key_file.write_text(service_account.to_json())
    config = FcmConfig(base_url=fcm.base_url, project_id=PROJECT_ID, service_account_file=key_file)
    provider = FcmProvider(config)
    try:
        assert isinstance(await provider.send(push("device-token-ok")), Accepted)
    finally:
        await provider.aclose()


def test_the_config_takes_exactly_one_service_account_source(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        FcmConfig(project_id=PROJECT_ID)
    with pytest.raises(ValidationError):
        FcmConfig(
            project_id=PROJECT_ID,
            service_account_file=tmp_path / "key.json",
            service_account_json=SecretStr("{}"),
        )


def test_a_key_that_is_not_a_service_account_is_refused_without_echoing_it() -> None:
    config = FcmConfig(
        project_id=PROJECT_ID, service_account_json=SecretStr('{"private_key": "SECRET"}')
    )

    with pytest.raises(ValueError, match="not a service-account key") as raised:
        FcmProvider(config)

    assert "SECRET" not in str(raised.value)


async def test_fcm_sends_no_receipts_so_every_callback_is_refused(provider: FcmProvider) -> None:
    callback = ProviderCallback(method="POST", url="/callbacks/fcm", headers={}, body=b"{}")

    with pytest.raises(MalformedCallback):
        await provider.parse_status(callback)


def test_the_address_is_the_push_token(provider: FcmProvider) -> None:
    assert provider.address(Recipient(push_token="device-1", email="a@example.org")) == "device-1"
    assert provider.address(Recipient(email="a@example.org")) is None
    assert provider.channel is Channel.PUSH
    assert provider.name == "fcm"
