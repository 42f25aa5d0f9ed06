"""A WhatsApp Cloud API simulator: a real HTTP server on 127.0.0.1 in the test's loop.

It answers `POST /{version}/{phone_number_id}/messages` like Graph API does (bearer
token, payload validation, error JSON with `code`/`error_data`/`fbtrace_id`) and then
posts signed status webhooks (`X-Hub-Signature-256`) to `webhook_url`. `send_text` posts
a user's text message to the same URL, signed the same way, as Meta does (one webhook
for statuses and messages); `redeliver` posts a webhook again, byte for byte.

What happens is chosen by the last two digits of the recipient number:

| ending | answer                                                         |
|--------|----------------------------------------------------------------|
| 26     | 400, code 131026 (message undeliverable)                       |
| 29     | 429, code 130429 (Cloud API throughput reached)                |
| 47     | 400, code 131047 (24 h re-engagement window closed)            |
| 56     | 400, code 131056 (business/consumer pair rate limit)           |
| 00     | 500, code 131000 (something went wrong)                        |
| 02     | 503, code 2 (service temporarily unavailable)                  |
| 44     | accepted, then a `failed` webhook with error 131026            |
| 77     | accepted, then only `sent` (e.g. the user blocked the business)|
| 88     | accepted, then `sent` and `read` (`delivered` skipped)         |
| other  | accepted, then `sent` and `delivered`                          |
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.simulators.server import LocalServer

_MESSAGES_PATH = "/{version}/{phone_number_id}/messages"
_WAIT_SECONDS = 5
_VERSION = re.compile(r"v\d+\.\d+")
_PHONE = re.compile(r"\+?\d{7,15}")

# ending -> (HTTP status, error code, title, details)
SYNC_ERRORS: dict[str, tuple[int, int, str, str]] = {
    "26": (400, 131026, "Message undeliverable", "Message Undeliverable."),
    "29": (429, 130429, "Rate limit hit", "Cloud API message throughput has been reached."),
    "47": (
        400,
        131047,
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer "
        "last replied to this number.",
    ),
    "56": (
        400,
        131056,
        "(Business Account, Consumer Account) pair rate limit hit",
        "Too many messages sent from the sender phone number to the same recipient phone "
        "number in a short period of time.",
    ),
    "00": (500, 131000, "Something went wrong", "Message failed to send due to an unknown error."),
    "02": (503, 2, "Service temporarily unavailable", "Temporary due to downtime or overload."),
}
STATUS_SEQUENCES: dict[str, tuple[str, ...]] = {
    "44": ("failed",),
    "77": ("sent",),
    "88": ("sent", "read"),
}
DEFAULT_SEQUENCE = ("sent", "delivered")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names, as received
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class SentWebhook:
    """One status webhook as the simulator sent it: exact bytes and headers."""

    url: str
    headers: dict[str, str]
    body: bytes
    status_code: int | None  # the receiver's answer; None when it could not be reached
    answer: bytes = b""  # the receiver's response body

    def json(self) -> Any:
        return json.loads(self.body)

    def answer_json(self) -> Any:
        return json.loads(self.answer)


def sign(app_secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `body`."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


class WhatsAppSimulator:
    def __init__(
        self,
        *,
        access_token: str = "sim-access-token",
        app_secret: str = "sim-app-secret",
        phone_number_id: str = "106540352242922",
        display_phone_number: str = "15550783881",
        waba_id: str = "102290129340398",
        webhook_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.access_token = access_token
        self.app_secret = app_secret
        self.phone_number_id = phone_number_id
        self.display_phone_number = display_phone_number
        self.waba_id = waba_id
        self.webhook_url = webhook_url
        self.clock = clock
        self.requests: list[RecordedRequest] = []
        self.webhooks: list[SentWebhook] = []
        self._deliveries: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(timeout=5)
        self._server = LocalServer(
            Starlette(routes=[Route(_MESSAGES_PATH, self._messages, methods=["POST"])])
        )
        self.base_url = ""

    async def __aenter__(self) -> Self:
        self.base_url = await self._server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.settle()
        await self._server.stop()
        await self._http.aclose()

    async def settle(self) -> None:
        """Wait until every scheduled status webhook has been posted."""
        while self._deliveries:
            await asyncio.gather(*self._deliveries)

    async def _messages(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.url.path,
                query=dict(request.query_params),
                headers=dict(request.headers),
                body=body,
            )
        )
        if request.headers.get("authorization") != f"Bearer {self.access_token}":
            return _graph_error(
                401, 190, "Invalid OAuth access token - Cannot parse access token", None
            )
        version = request.path_params["version"]
        phone_number_id = request.path_params["phone_number_id"]
        if not _VERSION.fullmatch(version):
            return _graph_error(400, 2635, f"Unknown API version {version}", None)
        if phone_number_id != self.phone_number_id:
            return _graph_error(
                400,
                100,
                f"Unsupported post request. Object with ID '{phone_number_id}' does not exist, "
                "cannot be loaded due to missing permissions, or does not support this operation",
                None,
                subcode=33,
                type_="GraphMethodException",
            )
        try:
            payload = json.loads(body)
        except ValueError:
            return _invalid_parameter("request body is not JSON")
        problem = _payload_problem(payload)
        if problem is not None:
            return _invalid_parameter(problem)

        to: str = payload["to"].removeprefix("+")
        ending = to[-2:]
        if ending in SYNC_ERRORS:
            status, code, title, details = SYNC_ERRORS[ending]
            return _graph_error(status, code, title, details)

        wamid = "wamid." + base64.b64encode(f"{to}:{uuid.uuid4().hex}".encode()).decode()
        sent: dict[str, Any] = {"id": wamid}
        if payload["type"] == "template":
            sent["message_status"] = "accepted"
        sequence = STATUS_SEQUENCES.get(ending, DEFAULT_SEQUENCE)
        task = asyncio.create_task(
            self._post_statuses(wamid, to, payload.get("biz_opaque_callback_data"), sequence)
        )
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        return JSONResponse(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": payload["to"], "wa_id": to}],
                "messages": [sent],
            }
        )

    async def _post_statuses(
        self, wamid: str, to: str, opaque: str | None, sequence: tuple[str, ...]
    ) -> None:
        for status in sequence:
            if self.webhook_url is None:
                return
            await self.post_webhook(self.status_payload(wamid, to, status, opaque))

    def status_payload(
        self, wamid: str, recipient_id: str, status: str, opaque: str | None = None
    ) -> dict[str, Any]:
        """A `messages` webhook carrying one status, in Cloud API's shape."""
        entry: dict[str, Any] = {
            "id": wamid,
            "status": status,
            "timestamp": str(int(self.clock())),
            "recipient_id": recipient_id,
        }
        if opaque is not None:
            entry["biz_opaque_callback_data"] = opaque
        if status == "failed":
            entry["errors"] = [
                {
                    "code": 131026,
                    "title": "Message undeliverable",
                    "message": "Message undeliverable",
                    "error_data": {"details": "Message Undeliverable."},
                    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
                }
            ]
        else:
            entry["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "utility"}
        return self._webhook({"statuses": [entry]})

    def inbound_text_payload(self, from_: str, text: str) -> dict[str, Any]:
        """A `messages` webhook carrying a user's message (no statuses)."""
        return self._webhook(
            {
                "contacts": [{"profile": {"name": "Sim User"}, "wa_id": from_}],
                "messages": [
                    {
                        "from": from_,
                        "id": "wamid." + secrets.token_hex(16),
                        "timestamp": str(int(self.clock())),
                        "type": "text",
                        "text": {"body": text},
                    }
                ],
            }
        )

    async def send_text(self, from_: str, text: str) -> SentWebhook:
        """A user's text message, signed and posted to `webhook_url` (the status URL: Meta
        has one webhook per app for statuses and messages)."""
        return await self.post_webhook(self.inbound_text_payload(from_.removeprefix("+"), text))

    async def redeliver(self, sent: SentWebhook) -> SentWebhook:
        """Post a webhook again, same bytes and signature (Meta retries unanswered ones)."""
        response = await self._http.post(sent.url, content=sent.body, headers=sent.headers)
        again = SentWebhook(
            sent.url, sent.headers, sent.body, response.status_code, response.content
        )
        self.webhooks.append(again)
        return again

    def _webhook(self, value: dict[str, Any]) -> dict[str, Any]:
        return {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": self.waba_id,
                    "changes": [
                        {
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": {
                                    "display_phone_number": self.display_phone_number,
                                    "phone_number_id": self.phone_number_id,
                                },
                                **value,
                            },
                            "field": "messages",
                        }
                    ],
                }
            ],
        }

    async def post_webhook(
        self, payload: dict[str, Any], *, app_secret: str | None = None
    ) -> SentWebhook:
        """Sign and POST `payload` to `webhook_url` the way Meta does (`app_secret`: sign
        with another secret, as a forger would)."""
        if self.webhook_url is None:
            raise RuntimeError("no webhook_url configured")
        # Meta escapes non-ASCII (\\uXXXX): the signature is over these exact bytes.
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            "x-hub-signature-256": sign(app_secret or self.app_secret, body),
            "user-agent": "facebookexternalua",
        }
        try:
            response = await self._http.post(self.webhook_url, content=body, headers=headers)
            status_code: int | None = response.status_code
            answer = response.content
        except httpx.TransportError:
            status_code, answer = None, b""
        sent = SentWebhook(self.webhook_url, headers, body, status_code, answer)
        self.webhooks.append(sent)
        return sent

    async def verify_webhook(self, callback_url: str, verify_token: str) -> bool:
        """Meta's subscription handshake: GET with hub.* params, expect the challenge back."""
        challenge = str(secrets.randbelow(10**9))
        response = await self._http.get(
            callback_url,
            params={
                "hub.mode": "subscribe",
                "hub.verify_token": verify_token,
                "hub.challenge": challenge,
            },
        )
        return response.status_code == 200 and response.text == challenge


def _payload_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return "request body must be a JSON object"
    if payload.get("messaging_product") != "whatsapp":
        return "messaging_product must be whatsapp"
    if payload.get("recipient_type", "individual") != "individual":
        return "recipient_type must be individual"
    to = payload.get("to")
    if not isinstance(to, str) or not _PHONE.fullmatch(to):
        return "to must be a phone number"
    opaque = payload.get("biz_opaque_callback_data")
    if opaque is not None and (not isinstance(opaque, str) or len(opaque.encode()) > 512):
        return "biz_opaque_callback_data must be a string of at most 512 bytes"
    kind = payload.get("type", "text")
    if kind == "text":
        text = payload.get("text")
        body = text.get("body") if isinstance(text, dict) else None
        if not isinstance(body, str) or not body or len(body) > 4096:
            return "text.body must be a string of 1 to 4096 characters"
        return None
    if kind == "template":
        return _template_problem(payload.get("template"))
    return f"unsupported message type {kind!r}"


def _template_problem(template: Any) -> str | None:
    if not isinstance(template, dict) or not isinstance(template.get("name"), str):
        return "template.name is required"
    language = template.get("language")
    if not isinstance(language, dict) or not isinstance(language.get("code"), str):
        return "template.language.code is required"
    components = template.get("components", [])
    if not isinstance(components, list):
        return "template.components must be a list"
    for component in components:
        if not isinstance(component, dict) or component.get("type") not in (
            "header",
            "body",
            "button",
        ):
            return "template component type must be header, body or button"
        for parameter in component.get("parameters", []):
            if not isinstance(parameter, dict) or (
                parameter.get("type") == "text" and not isinstance(parameter.get("text"), str)
            ):
                return "template text parameters need a text"
    return None


def _invalid_parameter(details: str) -> JSONResponse:
    return _graph_error(400, 100, "Invalid parameter", details)


def _graph_error(
    status: int,
    code: int,
    title: str,
    details: str | None,
    *,
    subcode: int | None = None,
    type_: str = "OAuthException",
) -> JSONResponse:
    error: dict[str, Any] = {"message": f"(#{code}) {title}", "type": type_, "code": code}
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = secrets.token_urlsafe(16)
    return JSONResponse({"error": error}, status_code=status)


@dataclass
class WebhookReceiver:
    """A tiny stand-in for our callback endpoint: records each request, answers via `handler`.

    `handler` gets the recorded request and returns (status, text body); the default
    answers 200 "OK" to everything.
    """

    handler: Callable[[RecordedRequest], Awaitable[tuple[int, str]]] | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._arrived = asyncio.Condition()
        self._server = LocalServer(
            Starlette(routes=[Route("/", self._receive, methods=["GET", "POST"])])
        )

    async def __aenter__(self) -> Self:
        self.url = await self._server.start() + "/"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._server.stop()

    async def wait_for(self, count: int) -> list[RecordedRequest]:
        """Wait (a few seconds at most) until `count` requests arrived; returns them all."""
        async with asyncio.timeout(_WAIT_SECONDS), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    async def _receive(self, request: Request) -> Response:
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers=dict(request.headers),
            body=await request.body(),
        )
        status, text = (200, "OK") if self.handler is None else await self.handler(recorded)
        async with self._arrived:
            self.requests.append(recorded)
            self._arrived.notify_all()
        return PlainTextResponse(text, status_code=status)
