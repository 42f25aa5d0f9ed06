"""Email over SMTP submission to a relay or ESP, and RFC 3464 bounce ingest.

A 250 from the relay means *accepted*, not delivered. Later news comes back as a
delivery status notification (DSN) mailed to the envelope sender; with `bounce_domain`
set that is a per-attempt VERP address (`bounce+<attempt id>@<bounce_domain>`), so a
bounce names its attempt even when the relay strips the returned message. The mail
pipeline that receives those DSNs POSTs each one raw (message/rfc822) to the callback
endpoint, signed `X-Cascade-Bounce-Signature: sha256=<hex HMAC-SHA256(bounce_secret, body)>`.

Attempt ids go verbatim into the VERP local part and the Message-ID, so they must be
dot-atom text (UUIDs, ULIDs); anything else is a programming error and raises ValueError.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.utils import format_datetime, getaddresses, parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Self

import aiosmtplib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from providers.base import (
    Accepted,
    Category,
    Channel,
    InvalidSignature,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    ReceiptStatus,
    Recipient,
    Rejected,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)

BOUNCE_SIGNATURE_HEADER = "X-Cascade-Bounce-Signature"
ATTEMPT_HEADER = "X-Cascade-Attempt"

_ATTEMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VERP_LOCAL_PART = re.compile(r"bounce\+(?P<attempt>[A-Za-z0-9][A-Za-z0-9._-]*)", re.IGNORECASE)
_DSN_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_AUTH_REQUIRED = 530
# Refusals at RCPT that are about the mailbox (busy, full), not about the relay.
_RECIPIENT_LEVEL_4XX = frozenset({450, 452})
# Where a DSN can say which envelope sender it was returned to.
_ENVELOPE_HEADERS = ("To", "Delivered-To", "X-Original-To", "Envelope-To")
_RETURNED_TYPES = frozenset(
    {"message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers"}
)


class SmtpConfig(BaseModel):
    """One SMTP relay. The `*_by_category` maps override the sender identity per category."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "smtp"
    host: str
    port: int = 587
    username: SecretStr | None = None
    password: SecretStr | None = None
    starttls: bool = True  # required STARTTLS (ignored with use_tls)
    use_tls: bool = False  # implicit TLS, usually port 465
    ca_file: Path | None = None  # trust anchor for the relay's certificate; system store if None
    local_hostname: str | None = None  # EHLO name; the machine's FQDN if None
    from_address: str
    from_address_by_category: dict[Category, str] = Field(default_factory=dict)
    reply_to: str | None = None
    reply_to_by_category: dict[Category, str] = Field(default_factory=dict)
    bounce_domain: str | None = None  # VERP return path bounce+<attempt>@bounce_domain
    bounce_secret: SecretStr | None = None  # signs bounce callbacks; none = refuse them all
    timeout_seconds: float = 10

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        return self


class SmtpProvider:
    """Submits one email per message to the relay, on a fresh connection per send."""

    channel: Channel = Channel.EMAIL

    def __init__(self, config: SmtpConfig) -> None:
        self.name = config.name
        self._config = config

    def address(self, to: Recipient) -> str | None:
        return to.email

    async def send(self, message: OutboundMessage) -> SendResult:
        if _ATTEMPT_ID.fullmatch(message.attempt_id) is None:
            raise ValueError(f"attempt id {message.attempt_id!r} is not dot-atom text")
        if not (message.content.text or message.content.html):
            return Rejected("smtp:no_content", "the message has neither text nor html")
        if not _is_one_mailbox(message.address):
            return Rejected("smtp:invalid_address", "the address is not one mailbox")
        composed = self._compose(message)
        config = self._config
        try:
            await aiosmtplib.send(
                composed,
                sender=self._envelope_sender(message.attempt_id, composed),
                recipients=[message.address],
                hostname=config.host,
                port=config.port,
                username=_reveal(config.username),
                password=_reveal(config.password),
                use_tls=config.use_tls,
                start_tls=config.starttls and not config.use_tls,
                cert_bundle=str(config.ca_file) if config.ca_file else None,
                local_hostname=config.local_hostname,
                timeout=config.timeout_seconds,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refusal = exc.recipients[0]
            return _classify_reply(refusal.code, refusal.message, at_recipient=True)
        except (
            aiosmtplib.SMTPAuthenticationError,
            aiosmtplib.SMTPHeloError,
            aiosmtplib.SMTPConnectResponseError,
        ) as exc:
            # Credentials, EHLO or greeting refused: the relay's setup, not this message.
            raise TransientProviderError(f"smtp:{exc.code}", exc.message) from exc
        except aiosmtplib.SMTPResponseException as exc:  # MAIL FROM, DATA
            return _classify_reply(exc.code, exc.message, at_recipient=False)
        except aiosmtplib.SMTPNotSupported as exc:  # e.g. SMTPUTF8 needed but not offered
            raise TransientProviderError("smtp:not_supported", exc.message) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TransientProviderError(_failure_code(exc), str(exc)) from exc
        return Accepted(str(composed["Message-ID"]))

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        """Read a signed RFC 3464 DSN: one update per failed or delivered recipient."""
        self._verify_bounce_signature(callback)
        report = email.message_from_bytes(callback.body, policy=email.policy.default)
        if (
            report.get_content_type() != "multipart/report"
            or str(report.get_param("report-type", "")).lower() != "delivery-status"
        ):
            raise MalformedCallback("not a multipart/report; report-type=delivery-status")
        status_part = next(
            (p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status"),
            None,
        )
        payload = status_part.get_payload() if status_part is not None else None
        blocks = [b for b in payload if isinstance(b, Message)] if isinstance(payload, list) else []
        if len(blocks) < 2:
            raise MalformedCallback("the report has no per-recipient delivery-status fields")
        per_message, *per_recipient = blocks

        returned = _returned_headers(report)
        attempt_id = self._attempt_from_verp(report) or _header_value(returned, ATTEMPT_HEADER)
        message_id = _header_value(returned, "Message-ID")
        if attempt_id is None and message_id is None:
            raise MalformedCallback("the report names no attempt of ours")

        updates = []
        for recipient_fields in per_recipient:
            update = _status_update(
                recipient_fields, per_message, attempt_id=attempt_id, message_id=message_id
            )
            if update is not None:
                updates.append(update)
        return updates

    async def aclose(self) -> None:
        """Nothing to close: every send opens and quits its own connection."""

    def _compose(self, message: OutboundMessage) -> EmailMessage:
        content = message.content
        sender = self._config.from_address_by_category.get(
            message.category, self._config.from_address
        )
        composed = EmailMessage()
        composed["From"] = sender
        composed["To"] = message.address
        reply_to = self._config.reply_to_by_category.get(message.category, self._config.reply_to)
        if reply_to:
            composed["Reply-To"] = reply_to
        subject = " ".join((content.subject or content.title or "").split())
        if subject:
            composed["Subject"] = subject
        composed["Date"] = format_datetime(datetime.now(UTC))
        composed["Message-ID"] = f"<{message.attempt_id}@{_domain(sender)}>"
        composed[ATTEMPT_HEADER] = message.attempt_id
        for name, value in message.headers.items():  # e.g. List-Unsubscribe (RFC 8058)
            composed[name] = value
        if content.text:
            composed.set_content(content.text)
            if content.html:
                composed.add_alternative(content.html, subtype="html")
        elif content.html:
            composed.set_content(content.html, subtype="html")
        return composed

    def _envelope_sender(self, attempt_id: str, composed: EmailMessage) -> str:
        if self._config.bounce_domain:
            return f"bounce+{attempt_id}@{self._config.bounce_domain}"
        return parseaddr(str(composed["From"]))[1]

    def _verify_bounce_signature(self, callback: ProviderCallback) -> None:
        secret = self._config.bounce_secret
        header = _header(callback.headers, BOUNCE_SIGNATURE_HEADER)
        if secret is None or header is None:
            raise InvalidSignature("missing bounce signature")
        scheme, _, signature = header.strip().partition("=")
        expected = hmac.new(
            secret.get_secret_value().encode(), callback.body, hashlib.sha256
        ).hexdigest()
        if scheme.lower() != "sha256" or not hmac.compare_digest(
            expected.encode(), signature.strip().lower().encode()
        ):
            raise InvalidSignature("bounce signature does not match")

    def _attempt_from_verp(self, report: Message) -> str | None:
        """The attempt id in the VERP address the DSN was returned to, if any."""
        bounce_domain = (self._config.bounce_domain or "").lower()
        headers = [str(value) for name in _ENVELOPE_HEADERS for value in report.get_all(name, [])]
        for _, address in getaddresses(headers):
            local_part, _, domain = address.rpartition("@")
            match = _VERP_LOCAL_PART.fullmatch(local_part)
            if match and (not bounce_domain or domain.lower() == bounce_domain):
                return match["attempt"]
        return None


def _classify_reply(code: int, text: str, *, at_recipient: bool) -> SendResult:
    if code == _AUTH_REQUIRED:  # we sent no credentials: the relay's setup, like a 401
        raise TransientProviderError(f"smtp:{code}", text)
    if 500 <= code < 600:
        return Rejected(f"smtp:{code}", text)
    recipient_level = at_recipient and code in _RECIPIENT_LEVEL_4XX
    raise TransientProviderError(f"smtp:{code}", text, provider_fault=not recipient_level)


def _failure_code(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "smtp:timeout"
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return "smtp:tls"
    if isinstance(exc, OSError):  # refused, reset, disconnected (aiosmtplib's are OSErrors)
        return "smtp:connection"
    return "smtp:protocol"  # e.g. STARTTLS or AUTH required but not offered


def _status_update(
    fields: Message,
    per_message: Message,
    *,
    attempt_id: str | None,
    message_id: str | None,
) -> StatusUpdate | None:
    action = str(fields.get("Action", "")).strip().lower()
    # delayed, relayed and expanded are not a final word on the recipient.
    if action == "failed":
        status = ReceiptStatus.FAILED
    elif action == "delivered":
        status = ReceiptStatus.DELIVERED
    else:
        return None
    status_match = _DSN_STATUS.search(str(fields.get("Status", "")))
    dsn_status = status_match.group() if status_match else None
    recipient = _address_field(fields.get("Final-Recipient") or fields.get("Original-Recipient"))
    diagnostic = " ".join(str(fields.get("Diagnostic-Code", "")).split()) or None
    digest = hashlib.sha256(
        "\0".join(
            [attempt_id or "", message_id or "", recipient or "", action, dsn_status or ""]
        ).encode()
    ).hexdigest()
    failed = status is ReceiptStatus.FAILED
    return StatusUpdate(
        status=status,
        event_id=f"dsn:{digest}",
        provider_message_id=message_id,
        attempt_id=attempt_id,
        error_code=f"smtp:{dsn_status or 'bounce'}" if failed else None,
        error_detail=diagnostic if failed else None,
        occurred_at=_date(fields.get("Last-Attempt-Date") or per_message.get("Arrival-Date")),
    )


def _returned_headers(report: EmailMessage) -> Message | None:
    """The headers of our original message as the DSN returned it (whole or headers only)."""
    for part in report.iter_parts():
        if part.get_content_type() not in _RETURNED_TYPES:
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]  # message/*: the parser already read it as a message
        if isinstance(payload, str):
            return email.message_from_string(part.get_content(), policy=email.policy.default)
    return None


def _header_value(message: Message | None, name: str) -> str | None:
    if message is None:
        return None
    value = message.get(name)
    if value is None:
        return None
    return str(value).strip() or None


def _address_field(value: object) -> str | None:
    """`rfc822; someone@example.org` → `someone@example.org`."""
    if value is None:
        return None
    _, _, address = str(value).partition(";")
    return address.strip() or None


def _date(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        return parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None


def _domain(address: str) -> str:
    return parseaddr(address)[1].rpartition("@")[2] or "localhost"


def _is_one_mailbox(address: str) -> bool:
    """One bare addr-spec: no display name, no list, no CR/LF to smuggle in headers."""
    return (
        "@" in address
        and not any(c in address for c in "\r\n")
        and getaddresses([address]) == [("", address)]
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None
