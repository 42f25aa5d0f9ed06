"""Per-category sender identities in one provider account's configuration."""

from __future__ import annotations

import uuid

import httpx2

from providers.base import Category, Channel, Content, OutboundMessage
from providers.smtp import SmtpConfig, SmtpProvider
from providers.twilio import TwilioConfig, TwilioProvider
from tests.conftest import Simulators


def outbound(category: Category, channel: Channel, address: str) -> OutboundMessage:
    return OutboundMessage(
        message_id=f"msg_{uuid.uuid4().hex}",
        attempt_id=uuid.uuid4().hex,
        category=category,
        channel=channel,
        address=address,
        content=Content(text="Spring sale", subject="Sale"),
        timeout_seconds=60,
    )


async def test_smtp_uses_the_categorys_from_and_reply_to(simulators: Simulators) -> None:
    provider = SmtpProvider(
        SmtpConfig(
            host=simulators.smtp.host,
            port=simulators.smtp.port,
            starttls=False,
            from_address="Shop <noreply@shop.test>",
            from_address_by_category={Category.MARKETING: "Shop News <news@shop.test>"},
            reply_to="help@shop.test",
            reply_to_by_category={Category.MARKETING: "marketing@shop.test"},
        )
    )
    news, receipt = f"news-{uuid.uuid4().hex[:6]}@example.com", f"r-{uuid.uuid4().hex[:6]}@x.test"

    await provider.send(outbound(Category.MARKETING, Channel.EMAIL, news))
    await provider.send(outbound(Category.TRANSACTIONAL, Channel.EMAIL, receipt))
    mails = {m.rcpt_tos[0]: m.message for m in simulators.smtp.messages}

    assert (mails[news]["From"], mails[news]["Reply-To"]) == (
        "Shop News <news@shop.test>",
        "marketing@shop.test",
    )
    assert (mails[receipt]["From"], mails[receipt]["Reply-To"]) == (
        "Shop <noreply@shop.test>",
        "help@shop.test",
    )


async def test_twilio_uses_the_categorys_sender() -> None:
    forms: list[bytes] = []

    def twilio(request: httpx2.Request) -> httpx2.Response:
        forms.append(request.content)
        return httpx2.Response(201, json={"sid": f"SM{uuid.uuid4().hex}", "status": "queued"})

    provider = TwilioProvider(
        TwilioConfig(
            account_sid="AC" + "2" * 32,
            auth_token="token",
            from_number="+15005550006",
            messaging_service_sid_by_category={Category.MARKETING: "MG" + "3" * 32},
        ),
        http=httpx2.AsyncClient(transport=httpx2.MockTransport(twilio)),
    )
    try:
        await provider.send(outbound(Category.MARKETING, Channel.SMS, "+48600100200"))
        await provider.send(outbound(Category.TRANSACTIONAL, Channel.SMS, "+48600100200"))
    finally:
        await provider.aclose()

    marketing, transactional = (dict(httpx2.QueryParams(form.decode())) for form in forms)
    assert marketing["MessagingServiceSid"] == "MG" + "3" * 32
    assert "MessagingServiceSid" not in transactional
    assert transactional["From"] == "+15005550006"
