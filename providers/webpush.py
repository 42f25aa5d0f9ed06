"""Web Push adapter: RFC 8030 delivery, RFC 8291 encryption (aes128gcm), RFC 8292 VAPID.

Each send POSTs one encrypted record to the browser subscription's endpoint with a
VAPID `Authorization` header. Encryption and signing use `cryptography` and PyJWT
directly: RFC 8291's single-record case is a few lines of ECDH + HKDF + AES-GCM, and
`pywebpush`/`py-vapid` would add a synchronous, requests-based stack for it.

Like FCM, the push service reports nothing after accepting: a push counts as delivered
only through the service's client receipt endpoint (the service worker posts it), so
`parse_status` refuses every callback. `TTL` equals the step timeout, so a push the
cascade has already given up on is dropped rather than shown after the SMS.

Web Push takes no idempotency key. Each push carries a `Topic` derived from the attempt
id, so a retried push replaces a first copy that is still queued at the push service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Self
from urllib.parse import urlsplit

import httpx2
import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_pem_private_key,
)
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from providers.base import (
    Accepted,
    Channel,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    Recipient,
    Rejected,
    SendResult,
    StatusUpdate,
    TransientProviderError,
    WebPushSubscription,
)
from providers.http import json_object, retry_after_seconds, transport_error

Urgency = Literal["very-low", "low", "normal", "high"]
URGENCIES: Final = frozenset({"very-low", "low", "normal", "high"})
TOPIC_METADATA_KEY: Final = "webpush_topic"
URGENCY_METADATA_KEY: Final = "webpush_urgency"

# RFC 8291 §4: push services must accept at least 4096 octets of body; more is not portable.
MAX_BODY_OCTETS: Final = 4096
RECORD_SIZE: Final = 4096
_HEADER_OCTETS: Final = 16 + 4 + 1 + 65  # salt, rs, idlen, keyid (the sender's public key)
_TAG_OCTETS: Final = 16
MAX_PLAINTEXT_OCTETS: Final = MAX_BODY_OCTETS - _HEADER_OCTETS - _TAG_OCTETS - 1

_VAPID_LIFETIME_SECONDS: Final = 12 * 3600  # RFC 8292 allows at most 24 h
_VAPID_RENEW_BEFORE_SECONDS: Final = 3600
_TOPIC: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_BASE64URL: Final = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


class WebPushConfig(BaseModel):
    """One VAPID identity (application server key pair + contact)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "webpush"
    vapid_private_key: SecretStr  # PEM, or the raw 32-byte P-256 scalar in base64url
    vapid_subject: str  # "mailto:ops@example.com" or an https URL
    timeout_seconds: float = Field(default=10, gt=0)
    urgency: Urgency = "normal"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.vapid_subject.startswith(("mailto:", "https://")):
            raise ValueError("vapid_subject must be a mailto: or https: URI")
        load_vapid_private_key(self.vapid_private_key.get_secret_value())
        return self


@dataclass(frozen=True, slots=True)
class _VapidHeader:
    value: str
    renew_at: float  # on the provider's clock (Unix seconds)


class InvalidSubscription(ValueError):
    """The subscription's keys are not a P-256 point and a 16-octet auth secret."""


class WebPushProvider:
    """Sends one encrypted push per message to a browser's push subscription.

    `clock` (Unix seconds) sets the VAPID token's `exp` and drives its cache; tests
    inject it to step past a token's lifetime without sleeping.
    """

    channel: Channel = Channel.PUSH

    def __init__(
        self,
        config: WebPushConfig,
        *,
        http: httpx2.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = config.name
        self._config = config
        self._signing_key = load_vapid_private_key(config.vapid_private_key.get_secret_value())
        self._public_key = b64url_encode(
            self._signing_key.public_key().public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint
            )
        )
        self._owns_http = http is None
        self._http = http if http is not None else httpx2.AsyncClient()
        self._clock = clock
        self._vapid_headers: dict[str, _VapidHeader] = {}

    @property
    def application_server_key(self) -> str:
        """The VAPID public key (base64url), what browsers pass to `pushManager.subscribe`."""
        return self._public_key

    def address(self, to: Recipient) -> str | None:
        return to.web_push.endpoint if to.web_push else None

    async def send(self, message: OutboundMessage) -> SendResult:
        subscription = message.web_push
        if subscription is None or subscription.endpoint != message.address:
            return Rejected("webpush:no_subscription", "the message carries no push subscription")
        plaintext = push_payload(message)
        if len(plaintext) > MAX_PLAINTEXT_OCTETS:
            return Rejected(
                "webpush:payload_too_large",
                f"{len(plaintext)} octets of payload; at most {MAX_PLAINTEXT_OCTETS} fit a push",
            )
        topic = message.metadata.get(TOPIC_METADATA_KEY) or attempt_topic(message.attempt_id)
        if not _TOPIC.match(topic):
            return Rejected("webpush:invalid_topic", "Topic: 1-32 base64url characters")
        urgency = message.metadata.get(URGENCY_METADATA_KEY, self._config.urgency)
        if urgency not in URGENCIES:
            return Rejected("webpush:invalid_urgency", f"Urgency: one of {sorted(URGENCIES)}")
        try:
            body = encrypt_push_message(plaintext, subscription)
            audience = endpoint_origin(subscription.endpoint)
        except InvalidSubscription as exc:
            return Rejected("webpush:invalid_subscription", str(exc))

        headers = {
            "TTL": str(max(0, message.timeout_seconds)),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Urgency": urgency,
            "Topic": topic,
            "Authorization": self._vapid_authorization(audience),
        }
        try:
            response = await self._http.post(
                subscription.endpoint,
                content=body,
                headers=headers,
                timeout=self._config.timeout_seconds,
            )
        except httpx2.TransportError as exc:
            raise transport_error("webpush", exc) from exc
        return classify_response(response, fallback_id=accepted_digest(message))

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        raise MalformedCallback(
            "push services send no delivery callbacks; receipts arrive at the client receipt"
            " endpoint"
        )

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _vapid_authorization(self, audience: str) -> str:
        """`vapid t=<JWT>, k=<key>` for this push service, reused until near its expiry."""
        now = self._clock()
        cached = self._vapid_headers.get(audience)
        if cached is not None and now < cached.renew_at:
            return cached.value
        expires = int(now) + _VAPID_LIFETIME_SECONDS
        token = jwt.encode(
            {"aud": audience, "exp": expires, "sub": self._config.vapid_subject},
            self._signing_key,
            algorithm="ES256",
        )
        header = _VapidHeader(
            f"vapid t={token}, k={self._public_key}", expires - _VAPID_RENEW_BEFORE_SECONDS
        )
        # One entry per push service origin: a handful, but customers choose the endpoints.
        self._vapid_headers = {
            aud: entry for aud, entry in self._vapid_headers.items() if now < entry.renew_at
        }
        self._vapid_headers[audience] = header
        return header.value


def push_payload(message: OutboundMessage) -> bytes:
    """The JSON the service worker receives in its `push` event."""
    content = message.content
    payload = {
        "title": content.title or content.subject,
        "body": content.text,
        "message_id": message.message_id,
        "attempt_id": message.attempt_id,
    }
    if message.receipt_token:
        # The service worker posts it back to confirm delivery: push services report none.
        payload["receipt_token"] = message.receipt_token
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def encrypt_push_message(
    plaintext: bytes,
    subscription: WebPushSubscription,
    *,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
    salt: bytes | None = None,
) -> bytes:
    """RFC 8291 message encryption as one RFC 8188 aes128gcm record (header included).

    `sender_key` and `salt` are fresh per message; they are parameters only so the
    RFC's own example can be reproduced byte for byte.
    """
    ua_public_bytes = b64url_decode(subscription.p256dh, "p256dh")
    auth_secret = b64url_decode(subscription.auth, "auth")
    if len(auth_secret) != 16:
        raise InvalidSubscription("auth must be a 16-octet secret")
    if len(ua_public_bytes) != 65:
        raise InvalidSubscription("p256dh must be an uncompressed P-256 point")
    try:
        ua_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public_bytes)
    except ValueError as exc:
        raise InvalidSubscription("p256dh is not a P-256 public key") from exc

    sender_key = sender_key if sender_key is not None else ec.generate_private_key(ec.SECP256R1())
    salt = salt if salt is not None else secrets.token_bytes(16)
    as_public_bytes = sender_key.public_key().public_bytes(
        Encoding.X962, PublicFormat.UncompressedPoint
    )
    ecdh_secret = sender_key.exchange(ec.ECDH(), ua_public)
    # RFC 8291 §3.4: the auth secret and both public keys are mixed into the input key.
    key_info = b"WebPush: info\x00" + ua_public_bytes + as_public_bytes
    ikm = _hkdf(salt=auth_secret, ikm=ecdh_secret, info=key_info, length=32)
    cek = _hkdf(salt=salt, ikm=ikm, info=b"Content-Encoding: aes128gcm\x00", length=16)
    nonce = _hkdf(salt=salt, ikm=ikm, info=b"Content-Encoding: nonce\x00", length=12)
    # A single, last record: the 0x02 delimiter and no padding (sequence number 0).
    ciphertext = AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)
    header = (
        salt + RECORD_SIZE.to_bytes(4, "big") + len(as_public_bytes).to_bytes(1, "big")
    ) + as_public_bytes
    return header + ciphertext


def _hkdf(*, salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def classify_response(response: httpx2.Response, *, fallback_id: str) -> SendResult:
    status = response.status_code
    if response.is_success:
        # 201 Created with the push message resource; without one the push is still taken.
        return Accepted(response.headers.get("location") or fallback_id)
    detail = _error_detail(response)
    if status in (404, 410):
        return Rejected("webpush:gone", detail)
    if status == 413:
        return Rejected("webpush:payload_too_large", detail)
    if status in (400, 401, 403):
        # Our VAPID key, claims or headers: every push through this config fails alike.
        raise TransientProviderError(f"webpush:{status}", detail)
    if status == 429 or status >= 500:
        raise TransientProviderError(
            f"webpush:{status}", detail, retry_after=retry_after_seconds(response)
        )
    return Rejected(f"webpush:{status}", detail)


def _error_detail(response: httpx2.Response) -> str:
    """The push service's message (autopush and FCM answer JSON; others plain text)."""
    body = json_object(response)
    for key in ("message", "error", "reason"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value[:200]
    return response.text[:200] or response.reason_phrase


def endpoint_origin(endpoint: str) -> str:
    """The push resource's origin (RFC 6454), the VAPID JWT's `aud`."""
    parts = urlsplit(endpoint)
    try:
        port_number = parts.port
    except ValueError as exc:
        raise InvalidSubscription("endpoint has an invalid port") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSubscription("endpoint must be an http(s) URL")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    default_port = 443 if parts.scheme == "https" else 80
    port = f":{port_number}" if port_number not in (None, default_port) else ""
    return f"{parts.scheme}://{host}{port}"


def attempt_topic(attempt_id: str) -> str:
    """32 base64url characters naming this attempt, for the `Topic` header."""
    return b64url_encode(hashlib.sha256(attempt_id.encode()).digest()[:24])


def accepted_digest(message: OutboundMessage) -> str:
    return (
        "webpush:" + hashlib.sha256(f"{message.address}\n{message.attempt_id}".encode()).hexdigest()
    )


def load_vapid_private_key(value: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM, or from base64url (raw 32-byte scalar or DER)."""
    text = value.strip()
    try:
        if text.startswith("-----BEGIN"):
            key: object = load_pem_private_key(text.encode(), password=None)
        else:
            raw = b64url_decode(text, "vapid_private_key")
            if len(raw) == 32:
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            else:
                key = load_der_private_key(raw, password=None)
    except (ValueError, TypeError):
        # Never echo the input: it is the private key.
        raise ValueError("vapid_private_key is not a P-256 private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("vapid_private_key is not a P-256 private key")
    return key


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(value: str, what: str) -> bytes:
    """Base64url with or without padding (browsers omit it), strict about the alphabet."""
    if not _BASE64URL.match(value):
        raise InvalidSubscription(f"{what} is not base64url")
    unpadded = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidSubscription(f"{what} is not base64url") from exc
