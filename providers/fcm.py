"""Firebase Cloud Messaging (HTTP v1) push adapter.

Auth is Google's service-account flow: an RS256 JWT assertion exchanged at the key's
`token_uri` for an OAuth2 access token (RFC 7523 JWT-bearer grant). It is done here
with PyJWT on the shared httpx client, because google-auth refreshes synchronously.

FCM reports nothing after the send: a push counts as delivered only through the
service's client receipt endpoint, so `parse_status` refuses every callback, and the
provider-side TTL (android.ttl, apns-expiration, webpush TTL) equals the step timeout
so a push that arrives after the fallover is dropped rather than shown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, model_validator

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
)
from providers.http import json_object, retry_after_seconds, transport_error

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"

_ASSERTION_LIFETIME_SECONDS = 3600
_TOKEN_REFRESH_MARGIN_SECONDS = 60.0
_MAX_TTL_SECONDS = 28 * 24 * 3600  # FCM caps android.ttl at four weeks

_PERMANENT_ERRORS = frozenset({"UNREGISTERED", "INVALID_ARGUMENT", "SENDER_ID_MISMATCH"})
_RETRYABLE_ERRORS = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})


class FcmConfig(BaseModel):
    """One FCM project. Exactly one of the two service-account sources is set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "fcm"
    base_url: str = "https://fcm.googleapis.com"
    project_id: str
    service_account_file: Path | None = None
    service_account_json: SecretStr | None = None
    token_uri: str | None = None  # overrides the key's own token_uri
    timeout_seconds: float = 10

    @model_validator(mode="after")
    def _one_service_account_source(self) -> Self:
        if (self.service_account_file is None) == (self.service_account_json is None):
            raise ValueError("set exactly one of service_account_file and service_account_json")
        return self


class _ServiceAccountKey(BaseModel):
    """The fields of a Google service-account JSON key that the grant needs."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["service_account"]
    client_email: str
    private_key: SecretStr
    private_key_id: str | None = None
    token_uri: str = "https://oauth2.googleapis.com/token"


@dataclass(frozen=True, slots=True)
class _AccessToken:
    value: str
    refresh_at: float  # on the provider's clock


class FcmProvider:
    """Sends push notifications through FCM HTTP v1 to one registration token per message.

    `clock` (monotonic seconds) only drives the access-token cache; it is injectable
    so tests can step past a token's lifetime without sleeping.
    """

    channel: Channel = Channel.PUSH

    def __init__(
        self,
        config: FcmConfig,
        *,
        http: httpx2.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        key = _load_service_account_key(config)
        self.name = config.name
        self._config = config
        self._client_email = key.client_email
        self._key_id = key.private_key_id
        self._signing_key = _load_rsa_private_key(key.private_key.get_secret_value())
        self._token_uri = config.token_uri or key.token_uri
        base = config.base_url.rstrip("/")
        self._send_url = f"{base}/v1/projects/{config.project_id}/messages:send"
        self._owns_http = http is None
        self._http = http if http is not None else httpx2.AsyncClient()
        self._clock = clock
        self._token: _AccessToken | None = None
        self._token_lock = asyncio.Lock()

    def address(self, to: Recipient) -> str | None:
        return to.push_token

    async def send(self, message: OutboundMessage) -> SendResult:
        body = _request_body(message)
        token = await self._access_token()
        response = await self._post_message(body, token)
        if response.status_code == 401 and _fcm_error(response).code != "THIRD_PARTY_AUTH_ERROR":
            # Our access token was revoked or expired early: one fresh grant, one retry.
            token = await self._access_token(stale=token)
            response = await self._post_message(body, token)
        return _classify(response, fallback_id=message.attempt_id)

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        raise MalformedCallback(
            "FCM sends no delivery callbacks; push receipts arrive at the client receipt endpoint"
        )

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _post_message(self, body: dict[str, Any], token: str) -> httpx2.Response:
        try:
            return await self._http.post(
                self._send_url,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=self._config.timeout_seconds,
            )
        except httpx2.TransportError as exc:
            raise transport_error("fcm", exc) from exc

    async def _access_token(self, *, stale: str | None = None) -> str:
        """The cached token, or a new grant when it is near expiry or was refused (`stale`)."""
        async with self._token_lock:
            cached = self._token
            if cached is not None and cached.value != stale and self._clock() < cached.refresh_at:
                return cached.value
            self._token = None
            self._token = await self._grant_access_token()
            return self._token.value

    async def _grant_access_token(self) -> _AccessToken:
        issued_at = int(time.time())
        assertion = jwt.encode(
            {
                "iss": self._client_email,
                "scope": FCM_SCOPE,
                "aud": self._token_uri,
                "iat": issued_at,
                "exp": issued_at + _ASSERTION_LIFETIME_SECONDS,
            },
            self._signing_key,
            algorithm="RS256",
            headers={"kid": self._key_id} if self._key_id else None,
        )
        requested_at = self._clock()
        try:
            response = await self._http.post(
                self._token_uri,
                data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
                timeout=self._config.timeout_seconds,
            )
        except httpx2.TimeoutException as exc:
            raise TransientProviderError("fcm:token_timeout", str(exc)) from exc
        except httpx2.TransportError as exc:
            raise TransientProviderError("fcm:token_transport", str(exc)) from exc

        payload = json_object(response)
        if not response.is_success:
            error = payload.get("error")
            code = error if isinstance(error, str) else str(response.status_code)
            raise TransientProviderError(
                f"fcm:token:{code}",
                str(payload.get("error_description", "")),
                retry_after=retry_after_seconds(response),
            )
        access_token = payload.get("access_token")
        expires_in = payload.get("expires_in")
        if not isinstance(access_token, str) or not isinstance(expires_in, int | float):
            raise TransientProviderError("fcm:token:malformed", "no access_token/expires_in")
        margin = min(_TOKEN_REFRESH_MARGIN_SECONDS, expires_in / 2)
        return _AccessToken(access_token, requested_at + expires_in - margin)


@dataclass(frozen=True, slots=True)
class _FcmError:
    code: str | None  # details[].errorCode of the FcmError entry
    status: str | None  # canonical status: NOT_FOUND, UNAUTHENTICATED, ...
    message: str


def _request_body(message: OutboundMessage) -> dict[str, Any]:
    ttl = min(max(message.timeout_seconds, 0), _MAX_TTL_SECONDS)
    content = message.content
    notification = {
        key: value
        for key, value in (("title", content.title or content.subject), ("body", content.text))
        if value
    }
    data = {"message_id": message.message_id, "attempt_id": message.attempt_id}
    if message.receipt_token:
        # The app posts it back to confirm delivery: FCM itself reports none.
        data["receipt_token"] = message.receipt_token
    fcm_message: dict[str, Any] = {
        "token": message.address,
        "data": data,
        "android": {"ttl": f"{ttl}s"},
        "apns": {"headers": {"apns-expiration": str(int(time.time()) + ttl)}},
        "webpush": {"headers": {"TTL": str(ttl)}},
    }
    if notification:
        fcm_message["notification"] = notification
    return {"message": fcm_message}


def _classify(response: httpx2.Response, *, fallback_id: str) -> SendResult:
    if response.is_success:
        name = json_object(response).get("name")
        # A 200 without a name still means FCM took the message; never resend it.
        return Accepted(name if isinstance(name, str) and name else fallback_id)

    error = _fcm_error(response)
    status_code = response.status_code
    code = f"fcm:{error.code or error.status or status_code}"
    if error.code in _PERMANENT_ERRORS:
        return Rejected(code, error.message)
    if error.code == "THIRD_PARTY_AUTH_ERROR" or status_code in (401, 403):
        # APNs/Web Push credentials or our project permissions: the provider's fault.
        raise TransientProviderError(code, error.message)
    if error.code in _RETRYABLE_ERRORS or status_code == 429 or status_code >= 500:
        raise TransientProviderError(code, error.message, retry_after=retry_after_seconds(response))
    return Rejected(code, error.message)


def _fcm_error(response: httpx2.Response) -> _FcmError:
    error = json_object(response).get("error")
    if not isinstance(error, dict):
        return _FcmError(None, None, response.text[:200])
    details = error.get("details")
    code = next(
        (
            detail.get("errorCode")
            for detail in (details if isinstance(details, list) else [])
            if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE
        ),
        None,
    )
    status = error.get("status")
    return _FcmError(
        code if isinstance(code, str) else None,
        status if isinstance(status, str) else None,
        str(error.get("message", "")),
    )


def _load_service_account_key(config: FcmConfig) -> _ServiceAccountKey:
    if config.service_account_json is not None:
        raw = config.service_account_json.get_secret_value()
    else:
        assert config.service_account_file is not None  # the config validator ensures it
        raw = config.service_account_file.read_text(encoding="utf-8")
    try:
        return _ServiceAccountKey.model_validate_json(raw)
    except ValidationError as exc:
        # Never echo the input: it holds the private key.
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise ValueError(f"not a service-account key (check: {fields})") from None


def _load_rsa_private_key(pem: str) -> RSAPrivateKey:
    key = load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("the service-account private_key is not an RSA key")
    return key
