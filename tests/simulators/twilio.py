"""A Twilio Programmable Messaging stand-in on 127.0.0.1 that speaks Twilio's wire format.

`POST /2010-04-01/Accounts/{AccountSid}/Messages.json` with HTTP Basic auth and form
fields, answered with Twilio's Message JSON (201) or its error JSON
(`{code, message, more_info, status}`). After accepting, it POSTs status callbacks to
`StatusCallback`, signed like Twilio (`X-Twilio-Signature`, computed with the official
`twilio` package) and carrying `I-Twilio-Idempotency-Token`.

What happens depends on how the `To` number ends (see `SimulatedNumber`):

    ...0211  400, code 21211 (invalid To)
    ...0610  400, code 21610 (recipient unsubscribed)
    ...0614  400, code 21614 (not a mobile number)
    ...0429  429, code 20429, with Retry-After
    ...0500  500, code 20500
    ...0408  answers only after `slow_response_seconds` (client timeouts)
    ...0777  accepted, reports `sent` and never a delivery receipt
    ...0999  accepted, reports `sent` then `undelivered` with ErrorCode 30003
    other    accepted, reports `sent` then `delivered`

    async with TwilioSimulator() as twilio, CallbackReceiver() as receiver:
        ...send to twilio.base_url with status_callback_url=receiver.url_for("/status")...
        await twilio.wait_for_status_reports()
        receiver.received  # the raw requests, as the service would see them
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import StrEnum
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from tests.simulators.server import LocalServer

LocalHTTPServer = LocalServer  # the name other simulators imported first

API_VERSION = "2010-04-01"
E164 = re.compile(r"^\+[1-9]\d{1,14}$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_VALIDITY_PERIOD = 36_000
STATUS_REPORTS_TIMEOUT_SECONDS = 5.0

DEFAULT_ACCOUNT_SID = "AC" + "0" * 31 + "1"
DEFAULT_AUTH_TOKEN = "simulated-auth-token"


class SimulatedNumber(StrEnum):
    """Recipient numbers that select a simulator behaviour."""

    DELIVERED = "+15550100001"
    INVALID_NUMBER = "+15550100211"
    UNSUBSCRIBED = "+15550100610"
    NOT_MOBILE = "+15550100614"
    RATE_LIMITED = "+15550100429"
    SERVER_ERROR = "+15550100500"
    SLOW = "+15550100408"
    NO_DELIVERY_RECEIPT = "+15550100777"
    UNDELIVERED = "+15550100999"


# Ending of To -> (HTTP status, Twilio code, message).
REFUSALS: Mapping[str, tuple[int, int, str]] = {
    "0211": (400, 21211, "The 'To' number {to} is not a valid phone number."),
    "0610": (400, 21610, "Attempt to send to unsubscribed recipient"),
    "0614": (400, 21614, "'To' number {to} is not a valid mobile number"),
    "0429": (429, 20429, "Too Many Requests"),
    "0500": (500, 20500, "Internal Server Error"),
}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the simulated Twilio API received."""

    method: str
    path: str
    headers: Mapping[str, str]
    form: Mapping[str, str]
    basic_auth: tuple[str, str] | None


@dataclass(slots=True)
class SimulatedMessage:
    sid: str
    to: str
    sender: str
    messaging_service_sid: str | None
    body: str
    status_callback: str | None
    validity_period: int | None
    status: str


@dataclass(frozen=True, slots=True)
class SentStatusReport:
    """One status callback the simulator POSTed, and how the receiver answered."""

    url: str
    headers: Mapping[str, str]
    body: bytes
    params: Mapping[str, str]
    response_status: int | None


@dataclass(frozen=True, slots=True)
class ReceivedCallback:
    """A request as the service's callback endpoint receives it: raw body, full URL."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)


class TwilioSimulator:
    def __init__(
        self,
        *,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        messaging_service_number: str = "+15550009999",
        retry_after_seconds: int = 3,
        slow_response_seconds: float = 2.0,
        callback_delay_seconds: float = 0.0,
        callback_concurrency: int = 1000,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.messaging_service_number = messaging_service_number
        self.retry_after_seconds = retry_after_seconds
        self.slow_response_seconds = slow_response_seconds
        self.callback_delay_seconds = callback_delay_seconds
        self.requests: list[RecordedRequest] = []
        self.messages: dict[str, SimulatedMessage] = {}
        self.status_reports: list[SentStatusReport] = []
        self._validator = RequestValidator(auth_token)
        self._reporting: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._callback_http = httpx2.AsyncClient(timeout=5.0)
        # Callbacks in flight at once (Twilio's senders are many, but not unbounded); the
        # rest wait here rather than in the HTTP client's pool.
        self._callback_slots = asyncio.Semaphore(callback_concurrency)
        self._server = LocalServer(
            Starlette(
                routes=[
                    Route(
                        f"/{API_VERSION}/Accounts/{{account_sid}}/Messages.json",
                        self._create_message,
                        methods=["POST"],
                    )
                ],
                exception_handlers={404: self._not_found},
            )
        )

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def message_submits(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/Messages.json")]

    async def __aenter__(self) -> Self:
        await self._server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closing.set()
        for task in self._reporting:
            task.cancel()
        await asyncio.gather(*self._reporting, return_exceptions=True)
        await self._server.stop()
        await self._callback_http.aclose()

    def reset(self) -> None:
        """Forget recorded requests and messages; stop reporting statuses not yet sent."""
        for task in self._reporting:
            task.cancel()
        self.requests.clear()
        self.messages.clear()
        self.status_reports.clear()

    async def wait_for_status_reports(self) -> None:
        """Wait until every status callback scheduled so far has been POSTed."""
        pending = [task for task in self._reporting if not task.cancelling()]
        async with asyncio.timeout(STATUS_REPORTS_TIMEOUT_SECONDS):
            await asyncio.gather(*pending)

    def sign(self, url: str, params: Mapping[str, str]) -> str:
        """X-Twilio-Signature for a request to `url` with these form parameters."""
        signature: str = self._validator.compute_signature(url, dict(params))
        return signature

    async def _create_message(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        auth = basic_auth(request.headers.get("authorization"))
        self.requests.append(
            RecordedRequest(request.method, request.url.path, dict(request.headers), form, auth)
        )
        if auth != (self.account_sid, self.auth_token):
            return twilio_error(401, 20003, "Authenticate")
        if request.path_params["account_sid"] != self.account_sid:
            return twilio_error(
                404, 20404, f"The requested resource {request.url.path} was not found"
            )

        to = form.get("To", "")
        sender = form.get("From")
        service_sid = form.get("MessagingServiceSid")
        if not to:
            return twilio_error(400, 21604, "A 'To' phone number is required.")
        if not sender and not service_sid:
            return twilio_error(400, 21603, "A 'From' phone number is required.")
        if not form.get("Body"):
            return twilio_error(400, 21602, "Message body is required.")
        if not E164.match(to):
            return twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        validity = form.get("ValidityPeriod")
        if validity is not None and not (
            validity.isdigit() and 1 <= int(validity) <= MAX_VALIDITY_PERIOD
        ):
            return twilio_error(400, 90007, "Invalid validity period value")

        ending = to[-4:]
        if ending in REFUSALS:
            status, code, text = REFUSALS[ending]
            headers = {"Retry-After": str(self.retry_after_seconds)} if status == 429 else None
            return twilio_error(status, code, text.format(to=to), headers=headers)
        if ending == SimulatedNumber.SLOW[-4:]:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.slow_response_seconds)

        message = SimulatedMessage(
            sid="SM" + secrets.token_hex(16),
            to=to,
            sender=sender or self.messaging_service_number,
            messaging_service_sid=service_sid,
            body=form["Body"],
            status_callback=form.get("StatusCallback"),
            validity_period=int(validity) if validity else None,
            # With a Messaging Service, Twilio accepts first and picks the sender later.
            status="accepted" if service_sid else "queued",
        )
        self.messages[message.sid] = message
        payload = self._message_resource(message, form_from=sender)
        if message.status_callback:
            task = asyncio.create_task(self._report_statuses(message, message.status_callback))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)
        return JSONResponse(payload, status_code=201)

    def _message_resource(self, message: SimulatedMessage, form_from: str | None) -> dict[str, Any]:
        now = format_datetime(datetime.now(UTC))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{message.sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": message.body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form_from,
            "messaging_service_sid": message.messaging_service_sid,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": message.sid,
            "status": message.status,
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": message.to,
            "uri": f"{uri}.json",
        }

    async def _report_statuses(self, message: SimulatedMessage, url: str) -> None:
        ending = message.to[-4:]
        # Twilio never reports the initial status; a Messaging Service moves accepted -> queued.
        plan: list[tuple[str, str | None]] = (
            [("queued", None)] if message.messaging_service_sid else []
        )
        plan.append(("sent", None))
        if ending == SimulatedNumber.UNDELIVERED[-4:]:
            plan.append(("undelivered", "30003"))
        elif ending != SimulatedNumber.NO_DELIVERY_RECEIPT[-4:]:
            plan.append(("delivered", None))
        for status, error_code in plan:
            await asyncio.sleep(self.callback_delay_seconds)
            message.status = status
            await self._post_status(message, url, error_code)

    async def _post_status(
        self, message: SimulatedMessage, url: str, error_code: str | None
    ) -> None:
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "From": message.sender,
            "MessageSid": message.sid,
            "MessageStatus": message.status,
            "SmsSid": message.sid,
            "SmsStatus": message.status,
            "To": message.to,
        }
        if message.messaging_service_sid:
            params["MessagingServiceSid"] = message.messaging_service_sid
        if error_code:
            params["ErrorCode"] = error_code
        if message.status in ("delivered", "undelivered"):
            params["RawDlrDoneDate"] = datetime.now(UTC).strftime("%y%m%d%H%M")
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
            "X-Twilio-Signature": self.sign(url, params),
        }
        body = urlencode(params).encode()
        response_status: int | None = None
        if urlsplit(url).hostname not in LOOPBACK_HOSTS:
            # Tests never reach the network: a non-local StatusCallback is recorded, not called.
            self.status_reports.append(SentStatusReport(url, headers, body, params, None))
            return
        try:
            async with self._callback_slots:
                response = await self._callback_http.post(url, content=body, headers=headers)
            response_status = response.status_code
        except httpx2.HTTPError:
            pass  # Twilio does not retry a failed status callback either; the report is lost.
        self.status_reports.append(SentStatusReport(url, headers, body, params, response_status))

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return twilio_error(404, 20404, f"The requested resource {request.url.path} was not found")


class CallbackReceiver:
    """Answers 200 to any POST and keeps each request exactly as it arrived."""

    def __init__(self) -> None:
        self.received: list[ReceivedCallback] = []
        self._server = LocalServer(
            Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])
        )

    def reset(self) -> None:
        self.received.clear()

    def url_for(self, path_and_query: str) -> str:
        return f"{self._server.base_url}{path_and_query}"

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

    async def _receive(self, request: Request) -> Response:
        # The URL from the raw path and query, as Twilio signed it, not a re-encoded one.
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        url = f"http://{request.headers['host']}{raw_path.decode()}"
        if query:
            url += f"?{query.decode()}"
        self.received.append(
            ReceivedCallback(
                method=request.method,
                url=url,
                headers=dict(request.headers),
                body=await request.body(),
                query=dict(request.query_params),
            )
        )
        return PlainTextResponse("")


def twilio_error(
    status: int, code: int, message: str, *, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password
