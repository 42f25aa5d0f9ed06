"""A Web Push service (RFC 8030) on 127.0.0.1 that also plays the subscribed browser.

`subscribe()` creates what a browser's `pushManager.subscribe()` gives the page: an
endpoint on this server plus a fresh P-256 key pair and 16-octet auth secret (RFC
8291). The simulator keeps the private half, so for every push it accepts it can do
what the browser would: decrypt the aes128gcm body and record the plaintext.

Decryption uses the `http_ece` package (the one pywebpush builds on), and the VAPID
JWT (RFC 8292) is checked by hand with `cryptography`, so neither check shares code
with the adapter under test.

Per push the service checks, like autopush/FCM do: the `vapid t=…, k=…` header, the
JWT's ES256 signature against `k`, its `aud` (this server's origin), `exp` (in the
future, at most 24 h ahead) and `sub` (mailto:/https:); `TTL`; `Content-Encoding:
aes128gcm`; `Urgency`/`Topic` syntax; a body of at most 4096 octets; and, for a
subscription restricted to an application server key, that `k` is that key.

Behaviour by how the endpoint ends (`subscribe(behaviour=...)`):

    .../gone        410 Gone (the browser unsubscribed)
    .../missing     404 Not Found (expired or unknown subscription)
    .../slow-down   429 Too Many Requests with Retry-After
    .../broken      503 Service Unavailable with Retry-After
    other           201 Created with a Location (the push message resource)
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import http_ece  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.simulators.server import LocalServer

MAX_BODY_OCTETS = 4096
MAX_VAPID_LIFETIME_SECONDS = 24 * 3600
URGENCIES = frozenset({"very-low", "low", "normal", "high"})
BEHAVIOURS = frozenset({"gone", "missing", "slow-down", "broken"})
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_VAPID_HEADER = re.compile(r"^vapid\s+(?P<params>.+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class BrowserSubscription:
    """A PushSubscription as the page sees it, plus the keys only the browser holds."""

    endpoint: str
    p256dh: str
    auth: str
    private_key: ec.EllipticCurvePrivateKey
    auth_secret: bytes

    def as_json(self) -> dict[str, Any]:
        """`PushSubscription.toJSON()`: the form Cascade's API takes in `recipient.web_push`."""
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": self.p256dh, "auth": self.auth},
        }


@dataclass(frozen=True, slots=True)
class RecordedPush:
    """One request to a push endpoint and what the service made of it."""

    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    status: int
    vapid_claims: Mapping[str, Any] | None  # the verified JWT payload
    vapid_key: str | None  # `k`, base64url
    plaintext: bytes | None  # what the browser decrypted (None: refused or undecryptable)
    decrypt_error: str | None = None

    def json(self) -> Any:
        assert self.plaintext is not None
        return json.loads(self.plaintext)


@dataclass(slots=True)
class _Subscriber:
    private_key: ec.EllipticCurvePrivateKey
    auth_secret: bytes
    application_server_key: bytes | None


class _Refusal(Exception):
    def __init__(self, status: int, errno: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.errno = errno
        self.message = message


class WebPushSimulator:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        retry_after_seconds: int = 7,
    ) -> None:
        self.clock = clock
        self.retry_after_seconds = retry_after_seconds
        self.pushes: list[RecordedPush] = []
        self._subscribers: dict[str, _Subscriber] = {}
        self._server = LocalServer(
            Starlette(
                routes=[
                    Route("/push/{token}", self._push, methods=["POST"]),
                    Route("/push/{token}/{behaviour}", self._push, methods=["POST"]),
                ]
            )
        )

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def delivered(self) -> list[RecordedPush]:
        """Pushes accepted and decrypted, i.e. what the service worker would receive."""
        return [p for p in self.pushes if p.status == 201 and p.plaintext is not None]

    async def __aenter__(self) -> Self:
        await self._server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._server.stop()

    def reset(self) -> None:
        self.pushes.clear()

    def subscribe(
        self, *, behaviour: str | None = None, application_server_key: str | None = None
    ) -> BrowserSubscription:
        """A new browser subscription on this service (like `pushManager.subscribe()`)."""
        if behaviour is not None and behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        token = secrets.token_urlsafe(24)
        private_key = ec.generate_private_key(ec.SECP256R1())
        auth_secret = secrets.token_bytes(16)
        self._subscribers[token] = _Subscriber(
            private_key,
            auth_secret,
            _b64url_decode(application_server_key) if application_server_key else None,
        )
        endpoint = f"{self.base_url}/push/{token}" + (f"/{behaviour}" if behaviour else "")
        public = private_key.public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint
        )
        return BrowserSubscription(
            endpoint=endpoint,
            p256dh=_b64url_encode(public),
            auth=_b64url_encode(auth_secret),
            private_key=private_key,
            auth_secret=auth_secret,
        )

    async def _push(self, request: Request) -> Response:
        body = await request.body()
        headers = {key.lower(): value for key, value in request.headers.items()}
        behaviour = request.path_params.get("behaviour")
        subscriber = self._subscribers.get(request.path_params["token"])
        claims: dict[str, Any] | None = None
        vapid_key: str | None = None
        try:
            if behaviour == "gone":
                raise _Refusal(410, 106, "Subscription is no longer valid")
            if subscriber is None or behaviour == "missing":
                raise _Refusal(404, 102, "Request did not validate: invalid token")
            claims, vapid_key = self._verify_vapid(headers.get("authorization"), subscriber)
            self._check_headers(headers)
            if len(body) > MAX_BODY_OCTETS:
                raise _Refusal(413, 104, f"Body is {len(body)} octets; at most 4096")
            if behaviour == "slow-down":
                raise _Refusal(429, 201, "Too many requests for this subscription")
            if behaviour == "broken":
                raise _Refusal(503, 202, "Service temporarily unavailable")
        except _Refusal as refusal:
            self.pushes.append(
                RecordedPush(
                    request.url.path, headers, body, refusal.status, claims, vapid_key, None
                )
            )
            return _error(refusal, retry_after=self.retry_after_seconds)

        # The push service only relays the bytes; the browser decrypts or silently drops.
        plaintext: bytes | None = None
        decrypt_error: str | None = None
        try:
            plaintext = http_ece.decrypt(
                body,
                private_key=subscriber.private_key,
                auth_secret=subscriber.auth_secret,
                version="aes128gcm",
            )
        except Exception as exc:  # http_ece raises assorted types on bad input
            decrypt_error = f"{type(exc).__name__}: {exc}"
        message_id = secrets.token_urlsafe(16)
        self.pushes.append(
            RecordedPush(
                request.url.path, headers, body, 201, claims, vapid_key, plaintext, decrypt_error
            )
        )
        return Response(
            status_code=201,
            headers={"Location": f"{self.base_url}/m/{message_id}", "TTL": headers["ttl"]},
        )

    def _verify_vapid(
        self, authorization: str | None, subscriber: _Subscriber
    ) -> tuple[dict[str, Any], str]:
        """RFC 8292: `vapid t=<JWT>, k=<key>`, the JWT ES256-signed by `k`'s private key."""
        match = _VAPID_HEADER.match(authorization or "")
        if match is None:
            raise _Refusal(401, 109, "Missing or non-vapid Authorization header")
        params = dict(
            part.strip().split("=", 1) for part in match["params"].split(",") if "=" in part
        )
        token, key = params.get("t"), params.get("k")
        if not token or not key:
            raise _Refusal(401, 109, "vapid Authorization needs t= and k=")
        try:
            key_bytes = _b64url_decode(key)
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key_bytes)
        except (binascii.Error, ValueError) as exc:
            raise _Refusal(401, 109, "k is not a P-256 public key") from exc
        if len(key_bytes) != 65:
            raise _Refusal(401, 109, "k must be an uncompressed P-256 point")
        if (
            subscriber.application_server_key is not None
            and subscriber.application_server_key != key_bytes
        ):
            raise _Refusal(403, 109, "k does not match the subscription's application server key")

        try:
            encoded_header, encoded_payload, encoded_signature = token.split(".")
            header = json.loads(_b64url_decode(encoded_header))
            claims = json.loads(_b64url_decode(encoded_payload))
            signature = _b64url_decode(encoded_signature)
        except (ValueError, binascii.Error) as exc:
            raise _Refusal(401, 109, "t is not a JWT") from exc
        if not isinstance(header, dict) or header.get("alg") != "ES256":
            raise _Refusal(401, 109, "the JWT must be signed with ES256")
        if len(signature) != 64:  # JWS ES256 is r || s, 32 octets each; not DER
            raise _Refusal(401, 109, "the JWT signature is not a 64-octet ES256 signature")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            public_key.verify(
                der,
                f"{encoded_header}.{encoded_payload}".encode(),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature as exc:
            raise _Refusal(401, 109, "the JWT signature does not verify with k") from exc

        if not isinstance(claims, dict):
            raise _Refusal(401, 109, "the JWT payload is not an object")
        now = self.clock()
        expires = claims.get("exp")
        if claims.get("aud") != self.base_url:
            raise _Refusal(401, 109, f"aud must be this push service's origin {self.base_url}")
        if not isinstance(expires, int) or expires <= now:
            raise _Refusal(401, 109, "the JWT has expired (or has no exp)")
        if expires > now + MAX_VAPID_LIFETIME_SECONDS:
            raise _Refusal(401, 109, "exp is more than 24 hours ahead")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.startswith(("mailto:", "https:")):
            raise _Refusal(401, 109, "sub must be a mailto: or https: URI")
        return claims, key

    def _check_headers(self, headers: Mapping[str, str]) -> None:
        ttl = headers.get("ttl")
        if ttl is None or not ttl.isdigit():
            raise _Refusal(400, 111, "TTL header is required (non-negative integer seconds)")
        if headers.get("content-encoding") != "aes128gcm":
            raise _Refusal(400, 110, "Content-Encoding must be aes128gcm")
        urgency = headers.get("urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise _Refusal(400, 110, "Urgency must be very-low, low, normal or high")
        topic = headers.get("topic")
        if topic is not None and not _TOPIC.match(topic):
            raise _Refusal(400, 110, "Topic must be at most 32 base64url characters")


def _error(refusal: _Refusal, *, retry_after: int) -> JSONResponse:
    """autopush's error body: {code, errno, error, message, more_info}."""
    reasons = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        410: "Gone",
        413: "Payload Too Large",
        429: "Too Many Requests",
        503: "Service Unavailable",
    }
    headers = {"Retry-After": str(retry_after)} if refusal.status in (429, 503) else None
    return JSONResponse(
        {
            "code": refusal.status,
            "errno": refusal.errno,
            "error": reasons.get(refusal.status, "Error"),
            "message": refusal.message,
            "more_info": "https://autopush.readthedocs.io/en/latest/http.html#error-codes",
        },
        status_code=refusal.status,
        headers=headers,
    )


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(value: str) -> bytes:
    unpadded = value.rstrip("=")
    return base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
