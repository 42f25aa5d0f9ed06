"""Twilio Programmable Messaging: outbound SMS and its status callbacks.

Sends with `POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json` (form-encoded,
HTTP Basic with the Account SID and Auth Token) and reads Twilio's StatusCallback
requests, verified with `X-Twilio-Signature` before any parameter is used.

Inbound messages (STOP/START replies) arrive on the number's or Messaging Service's
incoming-message webhook, pointed at `/v1/providers/<name>/inbound` and verified the same
way (`parse_inbound`). `cancel` withdraws a send Twilio still holds as `scheduled`;
Twilio refuses it for any other status, so for our immediate sends it answers False.

Out of scope here: MMS, and webhooks signed with a Webhooks-Rule SharedKey
(`X-Twilio-Webhooks-Signature-Settings`), which are refused because only the Auth Token
is configured.

Twilio's Messages API takes no idempotency key: a send that times out after Twilio
received it may be sent again by a retry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Self
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import httpx2
import pydantic
from pydantic import SecretStr

from providers.base import (
    Accepted,
    Category,
    Channel,
    InboundMessage,
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
from providers.http import json_object, retry_after_seconds, transport_error

API_VERSION = "2010-04-01"
SIGNATURE_HEADER = "x-twilio-signature"
SIGNATURE_SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"
IDEMPOTENCY_HEADER = "i-twilio-idempotency-token"
ATTEMPT_QUERY_PARAMETER = "attempt"
PORT_SUFFIX = re.compile(r":\d+$")

# Twilio's accepted range for ValidityPeriod, in seconds.
MIN_VALIDITY_PERIOD = 1
MAX_VALIDITY_PERIOD = 36_000

TRANSIENT_CODES = frozenset(
    {
        20429,  # too many concurrent requests: never processed, safe to retry
        21611,  # our sender's queue is full: the sender's capacity, not the recipient
    }
)

RECEIPT_STATUSES: Mapping[str, ReceiptStatus] = {
    "sent": ReceiptStatus.SENT,
    "delivered": ReceiptStatus.DELIVERED,
    "read": ReceiptStatus.READ,
    "undelivered": ReceiptStatus.FAILED,
    "failed": ReceiptStatus.FAILED,
    "canceled": ReceiptStatus.FAILED,
}

# Delivery errors seen most often in StatusCallback, for operators reading attempt rows.
DELIVERY_ERRORS: Mapping[str, str] = {
    "30003": "unreachable destination handset",
    "30004": "message blocked",
    "30005": "unknown destination handset",
    "30006": "landline or unreachable carrier",
    "30007": "message filtered by the carrier",
    "30008": "unknown error",
    "30036": "validity period expired",
}


class TwilioConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    name: str = "twilio"
    base_url: str = "https://api.twilio.com"
    account_sid: str = pydantic.Field(min_length=1)
    auth_token: SecretStr
    from_number: str | None = None
    messaging_service_sid: str | None = None
    # Sender identity per traffic category (e.g. a marketing messaging service).
    from_number_by_category: dict[Category, str] = pydantic.Field(default_factory=dict)
    messaging_service_sid_by_category: dict[Category, str] = pydantic.Field(default_factory=dict)
    timeout_seconds: float = pydantic.Field(default=10.0, gt=0)

    @pydantic.model_validator(mode="after")
    def require_a_sender(self) -> Self:
        if not self.from_number and not self.messaging_service_sid:
            raise ValueError("set from_number or messaging_service_sid")
        return self


class TwilioProvider:
    channel = Channel.SMS

    def __init__(self, config: TwilioConfig, *, http: httpx2.AsyncClient | None = None) -> None:
        self.name = config.name
        self._config = config
        self._owns_http = http is None
        self._http = http if http is not None else httpx2.AsyncClient()
        self._messages_url = (
            f"{config.base_url.rstrip('/')}/{API_VERSION}/Accounts/{config.account_sid}"
            "/Messages.json"
        )
        self._auth = httpx2.BasicAuth(config.account_sid, config.auth_token.get_secret_value())

    def address(self, to: Recipient) -> str | None:
        return to.phone

    async def send(self, message: OutboundMessage) -> SendResult:
        if not message.content.text:
            return Rejected(code="twilio:missing_body", detail="SMS needs content.text")
        try:
            response = await self._http.post(
                self._messages_url,
                data=self._message_form(message),
                auth=self._auth,
                timeout=self._config.timeout_seconds,
            )
        except httpx2.TransportError as exc:
            raise transport_error("twilio", exc) from exc
        return classify_send_response(response)

    def _message_form(self, message: OutboundMessage) -> dict[str, str]:
        form = {"To": message.address, "Body": message.content.text or ""}
        config = self._config
        from_number = config.from_number_by_category.get(message.category, config.from_number)
        service_sid = config.messaging_service_sid_by_category.get(
            message.category, config.messaging_service_sid
        )
        if from_number:
            form["From"] = from_number
        if service_sid:
            form["MessagingServiceSid"] = service_sid
        if message.status_callback_url:
            form["StatusCallback"] = message.status_callback_url
        # Matches the step timeout so Twilio drops an SMS the cascade has already given up on.
        form["ValidityPeriod"] = str(
            max(MIN_VALIDITY_PERIOD, min(message.timeout_seconds, MAX_VALIDITY_PERIOD))
        )
        return form

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        headers = {key.lower(): value for key, value in callback.headers.items()}
        url = callback_url(callback)
        params = verified_params(
            self._config.auth_token.get_secret_value(), url, callback.body, headers
        )
        return status_updates(params, url, headers.get(IDEMPOTENCY_HEADER))

    async def parse_inbound(self, callback: ProviderCallback) -> list[InboundMessage]:
        """An incoming-message webhook (`From`, `Body`, `MessageSid`), signature verified."""
        headers = {key.lower(): value for key, value in callback.headers.items()}
        params = verified_params(
            self._config.auth_token.get_secret_value(),
            callback_url(callback),
            callback.body,
            headers,
        )
        sender, sid = first(params, "From"), first(params, "MessageSid")
        if not sender or not sid:
            raise MalformedCallback("incoming message without From or MessageSid")
        return [
            InboundMessage(
                Channel.SMS, sender, first(params, "Body") or "", sid, to=first(params, "To")
            )
        ]

    async def cancel(self, provider_message_id: str) -> bool:
        """`Status=canceled` on the Message resource; Twilio refuses it once it is queued."""
        url = self._messages_url.removesuffix(".json") + f"/{provider_message_id}.json"
        try:
            response = await self._http.post(
                url,
                data={"Status": "canceled"},
                auth=self._auth,
                timeout=self._config.timeout_seconds,
            )
        except httpx2.TransportError as exc:
            # Withdrawing twice is harmless: always worth another try.
            raise transport_error("twilio", exc, idempotent=True) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientProviderError(
                f"twilio:{response.status_code}", str(json_object(response).get("message", ""))
            )
        return 200 <= response.status_code < 300 and json_object(response).get("status") == (
            "canceled"
        )

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def classify_send_response(response: httpx2.Response) -> SendResult:
    status = response.status_code
    body = json_object(response)
    code = body.get("code")
    detail = str(body.get("message") or response.reason_phrase)

    if 200 <= status < 300:
        sid = body.get("sid")
        if not isinstance(sid, str) or not sid:
            raise TransientProviderError("twilio:bad_response", f"{status} without a message sid")
        return Accepted(provider_message_id=sid)
    if status in (401, 403):
        raise TransientProviderError("twilio:auth", detail, provider_fault=True)
    if status == 429 or status >= 500 or code in TRANSIENT_CODES:
        raise TransientProviderError(
            f"twilio:{code or status}", detail, retry_after=retry_after_seconds(response)
        )
    return Rejected(code=f"twilio:{code or status}", detail=detail)


def callback_url(callback: ProviderCallback) -> str:
    """The URL Twilio called, query included: Twilio signs it exactly as given."""
    if callback.query and not urlsplit(callback.url).query:
        return f"{callback.url}?{urlencode(dict(callback.query))}"
    return callback.url


def verified_params(
    auth_token: str, url: str, body: bytes, headers: Mapping[str, str]
) -> dict[str, list[str]]:
    """The form parameters of a StatusCallback whose `X-Twilio-Signature` verifies."""
    if SIGNATURE_SETTINGS_HEADER in headers:
        raise InvalidSignature("signed with a Webhooks SharedKey, which is not configured")
    signature = headers.get(SIGNATURE_HEADER)
    if not signature:
        raise InvalidSignature(f"missing {SIGNATURE_HEADER}")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidSignature("body is not UTF-8 form data") from exc
    params: dict[str, list[str]] = {}
    for key, value in pairs:
        params.setdefault(key, []).append(value)

    provided = signature.encode()
    # Twilio signs the URL with or without the port inconsistently; its own validator tries both.
    if not any(
        hmac.compare_digest(expected_signature(auth_token, candidate, params).encode(), provided)
        for candidate in url_variants(url)
    ):
        raise InvalidSignature("X-Twilio-Signature does not match")
    return params


def expected_signature(auth_token: str, url: str, params: Mapping[str, list[str]]) -> str:
    """Base64(HMAC-SHA1(auth token, URL + each parameter's name and value, sorted by name))."""
    signed = url + "".join(
        name + value for name in sorted(params) for value in sorted(set(params[name]))
    )
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def url_variants(url: str) -> list[str]:
    """`url` as given, without its port and with the default port, like Twilio's validator."""
    parts = urlsplit(url)
    netloc = PORT_SUFFIX.sub("", parts.netloc)
    default_port = 443 if parts.scheme == "https" else 80
    without_port = urlunsplit(parts._replace(netloc=netloc))
    with_port = url if parts.port else urlunsplit(parts._replace(netloc=f"{netloc}:{default_port}"))
    return list(dict.fromkeys((url, without_port, with_port)))


def status_updates(
    params: Mapping[str, list[str]], url: str, idempotency_token: str | None
) -> list[StatusUpdate]:
    message_sid = first(params, "MessageSid")
    message_status = first(params, "MessageStatus")
    if not message_sid or not message_status:
        raise MalformedCallback("StatusCallback without MessageSid or MessageStatus")

    status = RECEIPT_STATUSES.get(message_status)
    if status is None:
        # queued, accepted, scheduled, sending, ...: nothing the cascade acts on.
        return []

    error_code = error_detail = None
    if status is ReceiptStatus.FAILED:
        twilio_code = first(params, "ErrorCode") or message_status
        error_code = f"twilio:{twilio_code}"
        error_detail = DELIVERY_ERRORS.get(twilio_code, f"Twilio reported {message_status}")

    event_id = (
        idempotency_token or hashlib.sha256(f"{message_sid}:{message_status}".encode()).hexdigest()
    )
    attempt_ids = parse_qs(urlsplit(url).query).get(ATTEMPT_QUERY_PARAMETER)
    return [
        StatusUpdate(
            status=status,
            event_id=event_id,
            provider_message_id=message_sid,
            attempt_id=attempt_ids[0] if attempt_ids else None,
            error_code=error_code,
            error_detail=error_detail,
        )
    ]


def first(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None
