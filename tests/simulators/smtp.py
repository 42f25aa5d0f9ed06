"""An SMTP relay simulator (aiosmtpd, own thread, 127.0.0.1) and RFC 3464 bounces.

The relay records every envelope it accepts. It can offer STARTTLS or speak implicit
TLS with a throwaway certificate, and require AUTH (which aiosmtpd only offers after
TLS, as a real submission server does). It answers by the local part of the address:

| address    | stage     | reply                                                 |
|------------|-----------|-------------------------------------------------------|
| reject@…   | RCPT TO   | 550 5.1.1 user unknown                                |
| busy@…     | RCPT TO   | 450 4.2.1 mailbox busy                                |
| full@…     | RCPT TO   | 452 4.2.2 mailbox full                                |
| down@…     | RCPT TO   | 421 4.3.2 service shutting down, then it hangs up     |
| spam@…     | DATA      | 554 5.7.1 message refused as spam                     |
| blocked@…  | MAIL FROM | 553 5.7.1 sender refused                              |
| other      |           | 250, recorded in `messages`                           |

`build_dsn` writes the bounce a downstream MTA (Postfix wording) would later mail to
the envelope sender of a recorded message; `sign_bounce` signs it the way the bounce
ingest pipeline posts it to Cascade.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import hashlib
import hmac
import ipaddress
import secrets
import socket
import ssl
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPORTING_MTA = "mx1.mail.example.net"

_RCPT_REPLIES = {
    "reject": "550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    "busy": "450 4.2.1 <{address}>: Mailbox busy, try again later",
    "full": "452 4.2.2 <{address}>: Mailbox full",
    "down": "421 4.3.2 Service shutting down, closing transmission channel",
}


@dataclass(frozen=True)
class TlsCertificate:
    """A self-signed certificate for 127.0.0.1, written as PEM files."""

    cert_file: Path
    key_file: Path

    @classmethod
    def generate(cls, directory: Path) -> Self:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp.simulator.test")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        cert_file, key_file = directory / "smtp-cert.pem", directory / "smtp-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cls(cert_file, key_file)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True)
class RecordedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # as received, CRLF line ends
    message: EmailMessage
    tls: bool
    authenticated_as: str | None


class SmtpSimulator:
    """A local relay on a free port; `messages` holds what it accepted, in order."""

    def __init__(
        self,
        *,
        certificate: TlsCertificate | None = None,
        tls: Literal["none", "starttls", "implicit"] = "none",
        credentials: tuple[str, str] | None = None,
    ) -> None:
        if tls != "none" and certificate is None:
            raise ValueError("TLS needs a certificate")
        self.messages: list[RecordedMail] = []
        self.auth_attempts: list[tuple[str, bool]] = []
        self._credentials = credentials
        self._lock = threading.Lock()
        smtp_options: dict[str, Any] = {"server_hostname": "relay.simulator.test"}
        if tls == "starttls":
            assert certificate is not None
            smtp_options |= {"tls_context": certificate.server_context(), "require_starttls": True}
        if credentials is not None:
            smtp_options |= {"auth_required": True, "authenticator": self._authenticate}
        self._controller = _PreboundController(
            _RelayHandler(self),
            ssl_context=certificate.server_context() if certificate and tls == "implicit" else None,
            **smtp_options,
        )
        self.host = "127.0.0.1"
        self.port = self._controller.port

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.messages.clear()
            self.auth_attempts.clear()

    def _record(self, mail: RecordedMail) -> None:
        with self._lock:
            self.messages.append(mail)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self._credentials is not None
            and secrets.compare_digest(data.login, self._credentials[0].encode())
            and secrets.compare_digest(data.password, self._credentials[1].encode())
        )
        login = data.login.decode() if isinstance(data, LoginPassword) else ""
        with self._lock:
            self.auth_attempts.append((login, ok))
        # handled=False: let aiosmtpd answer 235 or 535 5.7.8 itself.
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


class _RelayHandler:
    def __init__(self, simulator: SmtpSimulator) -> None:
        self._simulator = simulator

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if _local_part(address) == "blocked":
            return f"553 5.7.1 <{address}>: Sender address rejected: Access denied"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = _RCPT_REPLIES.get(_local_part(address))
        if reply is None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
            return "250 2.1.5 Ok"
        if reply.startswith("421") and server.transport is not None:
            # A 421 ends the session: hang up once the reply has been written.
            server.loop.call_soon(server.transport.close)
        return reply.format(address=address)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if any(_local_part(rcpt) == "spam" for rcpt in envelope.rcpt_tos):
            return "554 5.7.1 Message refused: classified as spam"
        data = envelope.original_content or b""
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self._simulator._record(
            RecordedMail(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=data,
                message=message,
                tls=session.ssl is not None  # STARTTLS
                or (
                    server.transport is not None
                    and server.transport.get_extra_info("ssl_object") is not None
                ),
                authenticated_as=session.auth_data if session.authenticated else None,
            )
        )
        return f"250 2.0.0 Ok: queued as {secrets.token_hex(5).upper()}"


class _PreboundController(Controller):
    """A Controller on a socket bound up front, so the port is free and known at once."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        super().__init__(handler, hostname="127.0.0.1", port=port, **kwargs)

    def _create_server(self) -> Awaitable[Any]:
        return self.loop.create_server(
            self._factory_invoker, sock=self._socket, ssl=self.ssl_context
        )


def build_dsn(
    mail: RecordedMail,
    *,
    recipient: str | None = None,
    action: Literal["failed", "delayed", "delivered"] = "failed",
    status: str = "5.1.1",
    diagnostic: str | None = None,
    returned: Literal["message", "headers", "none"] = "message",
    to: str | None = None,
) -> bytes:
    """The RFC 3464 report a downstream MTA mails to the envelope sender of `mail`."""
    recipient = recipient or mail.rcpt_tos[0]
    to = to or mail.mail_from
    remote_host = recipient.rpartition("@")[2]
    diagnostic = diagnostic or (
        f"smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown in "
        "virtual mailbox table"
    )
    now = dt.datetime.now(dt.UTC)
    queue_id = secrets.token_hex(5).upper()
    boundary = f"{queue_id}.{int(now.timestamp())}/{REPORTING_MTA}"
    subject, human = {
        "failed": (
            "Undelivered Mail Returned to Sender",
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients. It's attached below.",
        ),
        "delayed": (
            "Delayed Mail (still being retried)",
            "Your message could not be delivered for more than 4 hour(s).\n"
            "It will be retried until it is 5 day(s) old.",
        ),
        "delivered": (
            "Successful Mail Delivery Report",
            "Your message was successfully delivered to the destination(s)\nlisted below.",
        ),
    }[action]
    recipient_fields = [
        f"Final-Recipient: rfc822; {recipient}",
        f"Original-Recipient: rfc822;{recipient}",
        f"Action: {action}",
        f"Status: {status}",
        f"Remote-MTA: dns; mx.{remote_host}",
    ]
    if action != "delivered":
        # Folded the way Postfix folds long diagnostics.
        head, _, tail = diagnostic.partition(" rejected: ")
        folded = f"{head}\n    rejected: {tail}" if tail else diagnostic
        recipient_fields.append(f"Diagnostic-Code: {folded}")
    if action == "delayed":
        recipient_fields.append(f"Will-Retry-Until: {format_datetime(now + dt.timedelta(days=5))}")

    original = mail.data.replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape")
    original_headers = original.partition("\n\n")[0] + "\n"
    returned_part = {
        "message": (
            f"--{boundary}\nContent-Description: Undelivered Message\n"
            f"Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n{original}\n"
        ),
        "headers": (
            f"--{boundary}\nContent-Description: Undelivered Message Headers\n"
            f"Content-Type: text/rfc822-headers\nContent-Transfer-Encoding: 8bit\n\n"
            f"{original_headers}\n"
        ),
        "none": "",
    }[returned]
    report = (
        f"Return-Path: <>\n"
        f"Received: by {REPORTING_MTA} (Postfix)\n\tid {queue_id}; {format_datetime(now)}\n"
        f"Date: {format_datetime(now)}\n"
        f"From: MAILER-DAEMON@{REPORTING_MTA} (Mail Delivery System)\n"
        f"Subject: {subject}\n"
        f"To: {to}\n"
        f"Auto-Submitted: auto-replied\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\n"
        f'\tboundary="{boundary}"\n'
        f"Content-Transfer-Encoding: 8bit\n"
        f"Message-Id: <{queue_id}.{int(now.timestamp())}@{REPORTING_MTA}>\n"
        f"\n"
        f"This is a MIME-encapsulated message.\n"
        f"\n"
        f"--{boundary}\n"
        f"Content-Description: Notification\n"
        f"Content-Type: text/plain; charset=us-ascii\n"
        f"\n"
        f"This is the mail system at host {REPORTING_MTA}.\n"
        f"\n"
        f"{human}\n"
        f"\n"
        f"                   The mail system\n"
        f"\n"
        f"<{recipient}>: host mx.{remote_host}[192.0.2.25] said: {diagnostic}\n"
        f"\n"
        f"--{boundary}\n"
        f"Content-Description: Delivery report\n"
        f"Content-Type: message/delivery-status\n"
        f"\n"
        f"Reporting-MTA: dns; {REPORTING_MTA}\n"
        f"X-Postfix-Queue-ID: {queue_id}\n"
        f"X-Postfix-Sender: rfc822; {mail.mail_from}\n"
        f"Arrival-Date: {format_datetime(now - dt.timedelta(seconds=3))}\n"
        f"\n" + "\n".join(recipient_fields) + "\n\n"
        f"{returned_part}"
        f"--{boundary}--\n"
    )
    return report.replace("\n", "\r\n").encode("utf-8", "surrogateescape")


def sign_bounce(body: bytes, secret: str) -> str:
    """`X-Cascade-Bounce-Signature` as the bounce ingest pipeline computes it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _local_part(address: str) -> str:
    return address.strip("<>").rpartition("@")[0].lower()
