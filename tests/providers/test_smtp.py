"""SmtpProvider against a local relay over real sockets, and its RFC 3464 bounce ingest."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    InvalidSignature,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    ReceiptStatus,
    Recipient,
    Rejected,
    TransientProviderError,
)
from providers.smtp import SmtpConfig, SmtpProvider
from tests.simulators.smtp import (
    RecordedMail,
    SmtpSimulator,
    TlsCertificate,
    build_dsn,
    sign_bounce,
)

BOUNCE_SECRET = "bounce-secret-for-tests"
FROM = "Cascade <noreply@example.com>"
MARKETING_FROM = "Cascade News <news@example.com>"


@pytest.fixture(scope="module")
def relay() -> Iterator[SmtpSimulator]:
    with SmtpSimulator() as simulator:
        yield simulator


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificate:
    return TlsCertificate.generate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def submission_relay(certificate: TlsCertificate) -> Iterator[SmtpSimulator]:
    """Port-587 style: STARTTLS required, then AUTH required."""
    with SmtpSimulator(
        certificate=certificate, tls="starttls", credentials=("cascade", "app-password")
    ) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def implicit_tls_relay(certificate: TlsCertificate) -> Iterator[SmtpSimulator]:
    with SmtpSimulator(certificate=certificate, tls="implicit") as simulator:
        yield simulator


def config_for(relay: SmtpSimulator, **overrides: Any) -> SmtpConfig:
    fields: dict[str, Any] = {
        "host": relay.host,
        "port": relay.port,
        "starttls": False,
        "local_hostname": "cascade.test",
        "from_address": FROM,
        "from_address_by_category": {"marketing": MARKETING_FROM},
        "reply_to": "support@example.com",
        "bounce_domain": "bounces.example.com",
        "bounce_secret": SecretStr(BOUNCE_SECRET),
        "timeout_seconds": 5,
    }
    return SmtpConfig.model_validate(fields | overrides)


@pytest.fixture
def provider(relay: SmtpSimulator) -> SmtpProvider:
    relay.reset()
    return SmtpProvider(config_for(relay))


def email_to(
    address: str,
    *,
    attempt_id: str = "att-01",
    category: Category = Category.TRANSACTIONAL,
    content: Content | None = None,
) -> OutboundMessage:
    return OutboundMessage(
        message_id="msg-01",
        attempt_id=attempt_id,
        category=category,
        channel=Channel.EMAIL,
        address=address,
        content=content
        or Content(
            subject="Your sign-in code",
            text="Use 123456 to sign in.",
            html="<p>Use <b>123456</b> to sign in.</p>",
        ),
        timeout_seconds=600,
    )


def bounce(body: bytes, *, signature: str | None = None) -> ProviderCallback:
    return ProviderCallback(
        method="POST",
        url="/callbacks/smtp",
        headers={
            "content-type": "message/rfc822",
            "x-cascade-bounce-signature": signature or sign_bounce(body, BOUNCE_SECRET),
        },
        body=body,
    )


async def sent_mail(provider: SmtpProvider, relay: SmtpSimulator, **kwargs: Any) -> RecordedMail:
    assert isinstance(await provider.send(email_to("gone@example.org", **kwargs)), Accepted)
    return relay.messages[-1]


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# Sending


async def test_an_email_the_relay_takes_is_accepted_under_its_message_id(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    result = await provider.send(email_to("alice@example.org"))

    assert result == Accepted("<att-01@example.com>")
    [mail] = relay.messages
    assert mail.mail_from == "bounce+att-01@bounces.example.com"
    assert mail.rcpt_tos == ["alice@example.org"]
    message = mail.message
    assert message["Message-ID"] == "<att-01@example.com>"
    assert message["X-Cascade-Attempt"] == "att-01"
    assert message["From"] == FROM
    assert message["To"] == "alice@example.org"
    assert message["Reply-To"] == "support@example.com"
    assert message["Subject"] == "Your sign-in code"
    assert message["Date"] is not None
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert text.get_content().rstrip() == "Use 123456 to sign in."
    assert html.get_content_type() == "text/html"


@pytest.mark.parametrize(
    ("category", "sender"),
    [
        (Category.TRANSACTIONAL, FROM),
        (Category.SERVICE, FROM),
        (Category.MARKETING, MARKETING_FROM),
    ],
)
async def test_the_from_address_follows_the_category(
    provider: SmtpProvider, relay: SmtpSimulator, category: Category, sender: str
) -> None:
    await provider.send(email_to("alice@example.org", category=category))

    assert relay.messages[0].message["From"] == sender


async def test_without_a_bounce_domain_the_envelope_sender_is_the_from_address(
    relay: SmtpSimulator,
) -> None:
    relay.reset()
    provider = SmtpProvider(config_for(relay, bounce_domain=None))

    await provider.send(email_to("alice@example.org"))

    assert relay.messages[0].mail_from == "noreply@example.com"


async def test_a_text_only_email_is_one_plain_text_part(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    await provider.send(email_to("alice@example.org", content=Content(subject="Hi", text="Hello")))

    message = relay.messages[0].message
    assert message.get_content_type() == "text/plain"
    assert message.get_content().rstrip() == "Hello"


async def test_an_email_without_content_is_rejected_before_any_connection(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    result = await provider.send(email_to("alice@example.org", content=Content(subject="Hi")))

    assert isinstance(result, Rejected)
    assert result.code == "smtp:no_content"
    assert relay.messages == []


@pytest.mark.parametrize(
    "address",
    ["alice@example.org\r\nBcc: eve@example.net", "a@example.org, b@example.org", "alice"],
)
async def test_an_address_that_is_not_one_mailbox_is_rejected_unsent(
    provider: SmtpProvider, relay: SmtpSimulator, address: str
) -> None:
    result = await provider.send(email_to(address))

    assert isinstance(result, Rejected)
    assert result.code == "smtp:invalid_address"
    assert relay.messages == []


async def test_a_multi_line_subject_is_folded_into_one_line(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    await provider.send(
        email_to("alice@example.org", content=Content(subject="Hi\nthere", text="x"))
    )

    assert relay.messages[0].message["Subject"] == "Hi there"


async def test_an_attempt_id_unfit_for_an_address_is_a_programming_error(
    provider: SmtpProvider,
) -> None:
    with pytest.raises(ValueError, match="dot-atom"):
        await provider.send(email_to("alice@example.org", attempt_id="att@01"))


async def test_an_unknown_mailbox_is_rejected_for_good(provider: SmtpProvider) -> None:
    result = await provider.send(email_to("reject@example.org"))

    assert isinstance(result, Rejected)
    assert result.code == "smtp:550"
    assert "User unknown" in result.detail


@pytest.mark.parametrize(
    ("address", "code"), [("busy@example.org", 450), ("full@example.org", 452)]
)
async def test_a_busy_or_full_mailbox_is_transient_and_not_the_relays_fault(
    provider: SmtpProvider, address: str, code: int
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(email_to(address))

    assert raised.value.code == f"smtp:{code}"
    assert raised.value.provider_fault is False


async def test_a_relay_shutting_down_with_421_is_a_transient_provider_fault(
    provider: SmtpProvider,
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(email_to("down@example.org"))

    assert raised.value.code == "smtp:421"
    assert raised.value.provider_fault is True


async def test_content_refused_at_data_is_rejected(provider: SmtpProvider) -> None:
    result = await provider.send(email_to("spam@example.org"))

    assert isinstance(result, Rejected)
    assert result.code == "smtp:554"


async def test_a_refused_envelope_sender_is_rejected(relay: SmtpSimulator) -> None:
    provider = SmtpProvider(
        config_for(relay, bounce_domain=None, from_address="blocked@example.com")
    )

    result = await provider.send(email_to("alice@example.org"))

    assert isinstance(result, Rejected)
    assert result.code == "smtp:553"


async def test_a_refused_connection_is_a_transient_provider_fault(relay: SmtpSimulator) -> None:
    provider = SmtpProvider(config_for(relay, port=closed_port()))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(email_to("alice@example.org"))

    assert raised.value.code == "smtp:connection"
    assert raised.value.provider_fault is True


async def test_a_relay_that_never_greets_times_out_as_transient(relay: SmtpSimulator) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and hangs up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = SmtpProvider(config_for(relay, port=port, timeout_seconds=0.2))
    try:
        with pytest.raises(TransientProviderError) as raised:
            await provider.send(email_to("alice@example.org"))
    finally:
        server.close()
        await server.wait_closed()

    assert raised.value.code == "smtp:timeout"


async def test_starttls_then_auth_on_a_submission_relay(
    submission_relay: SmtpSimulator, certificate: TlsCertificate
) -> None:
    submission_relay.reset()
    provider = SmtpProvider(
        config_for(
            submission_relay,
            starttls=True,
            ca_file=certificate.cert_file,
            username=SecretStr("cascade"),
            password=SecretStr("app-password"),
        )
    )

    assert isinstance(await provider.send(email_to("alice@example.org")), Accepted)

    [mail] = submission_relay.messages
    assert mail.tls is True
    assert mail.authenticated_as == "cascade"


async def test_wrong_credentials_are_a_transient_provider_fault(
    submission_relay: SmtpSimulator, certificate: TlsCertificate
) -> None:
    submission_relay.reset()
    provider = SmtpProvider(
        config_for(
            submission_relay,
            starttls=True,
            ca_file=certificate.cert_file,
            username=SecretStr("cascade"),
            password=SecretStr("wrong"),
        )
    )

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(email_to("alice@example.org"))

    assert raised.value.code == "smtp:535"
    assert raised.value.provider_fault is True
    # aiosmtplib tries each mechanism the relay offers before giving up.
    assert submission_relay.auth_attempts
    assert all(attempt == ("cascade", False) for attempt in submission_relay.auth_attempts)
    assert submission_relay.messages == []


async def test_a_relay_requiring_auth_we_did_not_configure_is_a_transient_provider_fault(
    submission_relay: SmtpSimulator, certificate: TlsCertificate
) -> None:
    provider = SmtpProvider(
        config_for(submission_relay, starttls=True, ca_file=certificate.cert_file)
    )

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(email_to("alice@example.org"))

    assert raised.value.code == "smtp:530"
    assert raised.value.provider_fault is True


async def test_an_untrusted_relay_certificate_is_a_transient_provider_fault(
    submission_relay: SmtpSimulator,
) -> None:
    provider = SmtpProvider(config_for(submission_relay, starttls=True))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(email_to("alice@example.org"))

    assert raised.value.code == "smtp:tls"
    assert raised.value.provider_fault is True


async def test_required_starttls_missing_from_the_relay_is_a_transient_provider_fault(
    relay: SmtpSimulator,
) -> None:
    provider = SmtpProvider(config_for(relay, starttls=True))

    with pytest.raises(TransientProviderError) as raised:
        await provider.send(email_to("alice@example.org"))

    assert raised.value.code == "smtp:protocol"
    assert raised.value.provider_fault is True


async def test_implicit_tls(implicit_tls_relay: SmtpSimulator, certificate: TlsCertificate) -> None:
    implicit_tls_relay.reset()
    provider = SmtpProvider(
        config_for(implicit_tls_relay, use_tls=True, ca_file=certificate.cert_file)
    )

    assert isinstance(await provider.send(email_to("alice@example.org")), Accepted)
    assert implicit_tls_relay.messages[0].tls is True


# Bounces


async def test_a_hard_bounce_fails_the_attempt_named_by_the_verp_address(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    mail = await sent_mail(provider, relay, attempt_id="att-42")

    [update] = await provider.parse_status(bounce(build_dsn(mail, returned="none")))

    assert update.status is ReceiptStatus.FAILED
    assert update.attempt_id == "att-42"
    assert update.error_code == "smtp:5.1.1"
    assert update.error_detail == (
        "smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected: "
        "User unknown in virtual mailbox table"
    )
    assert update.occurred_at is not None
    assert update.event_id.startswith("dsn:")


async def test_a_bounce_to_a_plain_return_path_names_the_attempt_in_the_returned_headers(
    relay: SmtpSimulator,
) -> None:
    relay.reset()
    provider = SmtpProvider(config_for(relay, bounce_domain=None))
    mail = await sent_mail(provider, relay, attempt_id="att-7")
    assert mail.mail_from == "noreply@example.com"

    for returned in ("message", "headers"):
        dsn = build_dsn(mail, returned=returned)
        [update] = await provider.parse_status(bounce(dsn))

        assert update.status is ReceiptStatus.FAILED
        assert update.attempt_id == "att-7"
        assert update.provider_message_id == "<att-7@example.com>"


async def test_a_delay_notice_changes_nothing(provider: SmtpProvider, relay: SmtpSimulator) -> None:
    mail = await sent_mail(provider, relay)
    dsn = build_dsn(
        mail,
        action="delayed",
        status="4.4.1",
        diagnostic="smtp; 451 4.4.1 Greylisted, rejected: try again later",
    )

    assert await provider.parse_status(bounce(dsn)) == []


async def test_a_success_notice_marks_the_attempt_delivered(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    mail = await sent_mail(provider, relay)

    [update] = await provider.parse_status(
        bounce(build_dsn(mail, action="delivered", status="2.0.0"))
    )

    assert update.status is ReceiptStatus.DELIVERED
    assert update.attempt_id == "att-01"
    assert update.error_code is None


async def test_the_same_bounce_twice_has_the_same_event_id(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    first_mail = await sent_mail(provider, relay, attempt_id="att-1")
    second_mail = await sent_mail(provider, relay, attempt_id="att-2")

    [first] = await provider.parse_status(bounce(build_dsn(first_mail)))
    [again] = await provider.parse_status(bounce(build_dsn(first_mail)))  # new date, same news
    [second] = await provider.parse_status(bounce(build_dsn(second_mail)))

    assert first.event_id == again.event_id
    assert first.event_id != second.event_id


async def test_a_verp_address_of_another_bounce_domain_is_not_ours(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    mail = await sent_mail(provider, relay)
    dsn = build_dsn(mail, to="bounce+att-99@elsewhere.example", returned="headers")

    [update] = await provider.parse_status(bounce(dsn))

    assert update.attempt_id == "att-01"  # from the returned headers, not the foreign VERP


@pytest.mark.parametrize(
    "signature",
    [
        "sha256=" + "0" * 64,
        "sha1=0000000000000000000000000000000000000000",
        "not a signature",
        "sha256=é",
    ],
)
async def test_a_bounce_with_a_bad_signature_is_refused(
    provider: SmtpProvider, relay: SmtpSimulator, signature: str
) -> None:
    mail = await sent_mail(provider, relay)

    with pytest.raises(InvalidSignature):
        await provider.parse_status(bounce(build_dsn(mail), signature=signature))


async def test_a_bounce_altered_after_signing_is_refused(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    mail = await sent_mail(provider, relay)
    dsn = build_dsn(mail)
    signature = sign_bounce(dsn, BOUNCE_SECRET)

    with pytest.raises(InvalidSignature):
        await provider.parse_status(
            bounce(dsn.replace(b"Action: failed", b"Action: delivered"), signature=signature)
        )


async def test_an_unsigned_bounce_is_refused(provider: SmtpProvider, relay: SmtpSimulator) -> None:
    mail = await sent_mail(provider, relay)
    callback = ProviderCallback(method="POST", url="/", headers={}, body=build_dsn(mail))

    with pytest.raises(InvalidSignature):
        await provider.parse_status(callback)


async def test_without_a_bounce_secret_every_bounce_is_refused(
    relay: SmtpSimulator, provider: SmtpProvider
) -> None:
    mail = await sent_mail(provider, relay)
    unconfigured = SmtpProvider(config_for(relay, bounce_secret=None))

    with pytest.raises(InvalidSignature):
        await unconfigured.parse_status(bounce(build_dsn(mail)))


async def test_a_signed_message_that_is_not_a_dsn_is_malformed(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    mail = await sent_mail(provider, relay)

    with pytest.raises(MalformedCallback):
        await provider.parse_status(bounce(mail.data))


async def test_a_dsn_that_names_no_attempt_of_ours_is_malformed(
    provider: SmtpProvider, relay: SmtpSimulator
) -> None:
    mail = await sent_mail(provider, relay)
    dsn = build_dsn(mail, to="postmaster@example.com", returned="none")

    with pytest.raises(MalformedCallback):
        await provider.parse_status(bounce(dsn))


# Configuration


def test_credentials_come_in_pairs() -> None:
    with pytest.raises(ValidationError):
        SmtpConfig(host="smtp.example.com", from_address=FROM, username=SecretStr("u"))


def test_the_address_is_the_email(provider: SmtpProvider) -> None:
    assert provider.address(Recipient(email="a@example.org", push_token="t")) == "a@example.org"
    assert provider.address(Recipient(push_token="t")) is None
    assert provider.channel is Channel.EMAIL
    assert provider.name == "smtp"


async def test_aclose_is_harmless(provider: SmtpProvider) -> None:
    await provider.aclose()
    await provider.aclose()
