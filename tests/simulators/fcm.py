"""An FCM HTTP v1 simulator: Google's OAuth2 token endpoint and `messages:send`, served
by uvicorn on 127.0.0.1 inside the test's event loop.

The token endpoint takes the RFC 7523 JWT-bearer grant the way oauth2.googleapis.com
does: it verifies the RS256 assertion with the public key of a registered service
account (by `iss`, checking `kid`), the audience (its own URL), the FCM scope and a
lifetime of at most an hour, and answers `{"access_token", "expires_in", "token_type"}`
or `400 {"error": "invalid_grant", ...}`.

`messages:send` only takes bearer tokens it issued (401 UNAUTHENTICATED otherwise),
validates the message like FCM (400 INVALID_ARGUMENT with a google.rpc.BadRequest),
and answers by the end of the registration token:

| ending         | answer                                                    |
|----------------|-----------------------------------------------------------|
| unregistered   | 404 NOT_FOUND, errorCode UNREGISTERED                     |
| invalid        | 400 INVALID_ARGUMENT, errorCode INVALID_ARGUMENT          |
| senderid       | 403 PERMISSION_DENIED, errorCode SENDER_ID_MISMATCH       |
| thirdpartyauth | 401 UNAUTHENTICATED, errorCode THIRD_PARTY_AUTH_ERROR     |
| quota          | 429 RESOURCE_EXHAUSTED, errorCode QUOTA_EXCEEDED, Retry-After |
| unavailable    | 503 UNAVAILABLE, errorCode UNAVAILABLE, Retry-After       |
| internal       | 500 INTERNAL, errorCode INTERNAL                          |
| other          | 200 `{"name": "projects/<id>/messages/<id>"}`             |
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.simulators.server import LocalServer

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"

_DURATION = re.compile(r"\d+(\.\d{1,9})?s")
_MESSAGE_FIELDS = frozenset(
    {
        "name",
        "data",
        "notification",
        "android",
        "webpush",
        "apns",
        "fcm_options",
        "token",
        "topic",
        "condition",
    }
)
_RESERVED_DATA_KEYS = frozenset({"from", "gcm", "message_type", "notification"})

# ending of the registration token -> (HTTP status, canonical status, errorCode, message)
_TOKEN_BEHAVIOURS: dict[str, tuple[int, str, str, str]] = {
    "unregistered": (404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    "invalid": (
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ),
    "senderid": (403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    "thirdpartyauth": (
        401,
        "UNAUTHENTICATED",
        "THIRD_PARTY_AUTH_ERROR",
        "Auth error from APNS or Web Push Service",
    ),
    "quota": (
        429,
        "RESOURCE_EXHAUSTED",
        "QUOTA_EXCEEDED",
        "Quota exceeded for quota metric 'Send requests'.",
    ),
    "unavailable": (503, "UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
    "internal": (500, "INTERNAL", "INTERNAL", "Internal error encountered."),
}
_WITH_RETRY_AFTER = frozenset({"quota", "unavailable"})


@dataclass(frozen=True)
class ServiceAccount:
    """A throwaway Google service-account key, as the JSON file a project downloads."""

    project_id: str
    client_email: str
    private_key_id: str
    private_key_pem: str
    public_key: RSAPublicKey
    token_uri: str

    @classmethod
    def generate(cls, *, project_id: str, token_uri: str) -> Self:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return cls(
            project_id=project_id,
            client_email=f"firebase-adminsdk-test@{project_id}.iam.gserviceaccount.com",
            private_key_id=secrets.token_hex(20),
            private_key_pem=pem,
            public_key=key.public_key(),
            token_uri=token_uri,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "type": "service_account",
                "project_id": self.project_id,
                "private_key_id": self.private_key_id,
                "private_key": self.private_key_pem,
                "client_email": self.client_email,
                "client_id": "100000000000000000000",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": self.token_uri,
                "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
                "universe_domain": "googleapis.com",
            }
        )


@dataclass(frozen=True)
class RecordedSend:
    project_id: str
    headers: dict[str, str]  # lower-case names, as received
    body: dict[str, Any]
    status_code: int


class FcmSimulator:
    """Token endpoint at `token_uri`, FCM at `base_url`; both on one local port."""

    def __init__(self, *, project_id: str, retry_after_seconds: int = 7) -> None:
        self.project_id = project_id
        self.retry_after_seconds = retry_after_seconds
        self.token_lifetime_seconds = 3599
        self.token_grants = 0
        self.refused_grants: list[str] = []  # error_description of each refused grant
        self.sends: list[RecordedSend] = []
        self._accounts: dict[str, ServiceAccount] = {}
        self._issued_tokens: set[str] = set()
        self._message_ids = itertools.count(1_500_000_000_000_000)
        self._server = LocalServer(
            Starlette(
                routes=[
                    Route("/token", self._token, methods=["POST"]),
                    Route("/v1/projects/{project_id}/messages:send", self._send, methods=["POST"]),
                ]
            )
        )

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def token_uri(self) -> str:
        return f"{self._server.base_url}/token"

    def register(self, account: ServiceAccount) -> None:
        """Make the account's public key known, as Google knows the keys it issued."""
        self._accounts[account.client_email] = account

    def revoke_access_tokens(self) -> None:
        self._issued_tokens.clear()

    def reset(self) -> None:
        self.token_grants = 0
        self.refused_grants.clear()
        self.sends.clear()
        self._issued_tokens.clear()
        self.token_lifetime_seconds = 3599

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _token(self, request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        if form.get("grant_type") != [JWT_BEARER_GRANT]:
            return self._refuse_grant("unsupported_grant_type", "Invalid grant_type.")
        assertion = form.get("assertion", [""])[0]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.InvalidTokenError:
            return self._refuse_grant("invalid_request", "Invalid JWT.")
        account = self._accounts.get(str(unverified.get("iss")))
        if account is None:
            return self._refuse_grant("invalid_grant", "Invalid email or User ID")
        if header.get("kid") != account.private_key_id:
            return self._refuse_grant("invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidTokenError as exc:
            return self._refuse_grant("invalid_grant", f"Invalid JWT: {exc}")
        if int(claims["exp"]) - int(claims["iat"]) > 3600:
            return self._refuse_grant(
                "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes)"
            )
        if FCM_SCOPE not in str(claims["scope"]).split():
            return self._refuse_grant("invalid_scope", "Invalid OAuth scope or ID token audience.")
        access_token = f"ya29.{secrets.token_urlsafe(48)}"
        self._issued_tokens.add(access_token)
        self.token_grants += 1
        return JSONResponse(
            {
                "access_token": access_token,
                "expires_in": self.token_lifetime_seconds,
                "token_type": "Bearer",
            }
        )

    def _refuse_grant(self, error: str, description: str) -> Response:
        self.refused_grants.append(description)
        return JSONResponse({"error": error, "error_description": description}, status_code=400)

    async def _send(self, request: Request) -> Response:
        project_id = request.path_params["project_id"]
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        authorized = scheme == "Bearer" and token in self._issued_tokens
        response = self._answer_send(project_id, body, authorized=authorized)
        self.sends.append(
            RecordedSend(
                project_id=project_id,
                headers=dict(request.headers),
                body=body if isinstance(body, dict) else {},
                status_code=response.status_code,
            )
        )
        return response

    def _answer_send(self, project_id: str, body: Any, *, authorized: bool) -> Response:
        if not authorized:
            return _error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
            )
        if project_id != self.project_id:
            return _error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' "
                "(or it may not exist).",
            )
        violations = list(_violations(body))
        if violations:
            return _error(
                400,
                "INVALID_ARGUMENT",
                violations[0][1],
                details=[
                    {
                        "@type": BAD_REQUEST_TYPE,
                        "fieldViolations": [
                            {"field": field, "description": description}
                            for field, description in violations
                        ],
                    }
                ],
            )
        behaviour = _behaviour(str(body["message"].get("token", "")))
        if behaviour is None:
            name = f"projects/{self.project_id}/messages/0:{next(self._message_ids)}%31bd1c96"
            return JSONResponse({"name": name})
        http_status, status, error_code, message = _TOKEN_BEHAVIOURS[behaviour]
        return _error(
            http_status,
            status,
            message,
            details=[{"@type": FCM_ERROR_TYPE, "errorCode": error_code}],
            headers={"Retry-After": str(self.retry_after_seconds)}
            if behaviour in _WITH_RETRY_AFTER
            else None,
        )


def _behaviour(token: str) -> str | None:
    return next((ending for ending in _TOKEN_BEHAVIOURS if token.endswith(ending)), None)


def _error(
    http_status: int,
    status: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": http_status, "message": message, "status": status}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=http_status, headers=headers)


def _violations(body: object) -> Iterator[tuple[str, str]]:
    """Field violations, as FCM reports them in a google.rpc.BadRequest."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        yield "message", "Request contains an invalid argument."
        return
    message: dict[str, Any] = body["message"]
    for name in message.keys() - _MESSAGE_FIELDS:
        yield "message", f"Invalid JSON payload received. Unknown name \"{name}\" at 'message'"
    targets = [name for name in ("token", "topic", "condition") if name in message]
    if len(targets) != 1:
        yield "message", "Exactly one of token, topic or condition must be set."
    data = message.get("data", {})
    if not isinstance(data, dict):
        yield "message.data", "Invalid value at 'message.data'"
    else:
        for index, (key, value) in enumerate(data.items()):
            if not isinstance(value, str):
                yield f"message.data[{index}].value", f"Invalid value at 'message.data[{index}]'"
            if key in _RESERVED_DATA_KEYS or key.startswith(("google", "gcm")):
                yield f"message.data[{index}].key", f"Invalid data key: {key}"
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or any(
        key not in {"title", "body", "image"} or not isinstance(value, str)
        for key, value in notification.items()
    ):
        yield "message.notification", "Invalid value at 'message.notification'"
    android = message.get("android", {})
    ttl = android.get("ttl") if isinstance(android, dict) else None
    if ttl is not None and not (isinstance(ttl, str) and _DURATION.fullmatch(ttl)):
        yield "message.android.ttl", "Invalid value at 'message.android.ttl' (Duration)"
    for platform in ("apns", "webpush"):
        section = message.get(platform, {})
        headers = section.get("headers", {}) if isinstance(section, dict) else None
        if not isinstance(headers, dict) or not all(
            isinstance(value, str) for value in headers.values()
        ):
            yield f"message.{platform}.headers", f"Invalid value at 'message.{platform}.headers'"
        elif platform == "apns" and not headers.get("apns-expiration", "0").isdigit():
            yield "message.apns.headers", "apns-expiration must be a UNIX epoch date in seconds"
        elif platform == "webpush" and not headers.get("TTL", "0").isdigit():
            yield "message.webpush.headers", "TTL must be a number of seconds"
