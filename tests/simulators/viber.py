"""A Viber REST Bot API stand-in on 127.0.0.1 that speaks Viber's wire format.

`POST /pa/send_message` with `X-Viber-Auth-Token` is answered like Viber does: HTTP 200
and `{"status": 0, "status_message": "ok", "message_token": <int64>, "chat_hostname"}`,
or a non-zero `status` with its `status_message`. After accepting, the simulator POSTs
receipt events (`delivered`, `seen`, `failed`) to the bot's webhook, signed with
`X-Viber-Content-Signature` = hex HMAC-SHA256(auth token, raw body). The webhook is
`webhook_url`, or whatever `POST /pa/set_webhook` last set (which, like Viber, first
sends a signed `webhook` event to the new URL). `send_text` posts a subscriber's text
message there as a signed `message` event, as Viber does; `redeliver` posts one again.

What happens depends on how the receiver id ends (see `SimulatedReceiver`):

    ...not-registered=   status 5 receiverNotRegistered
    ...not-subscribed=   status 6 receiverNotSubscribed
    ...old-device=       status 11 receiverNoSuitableDevice
    ...throttled=        status 12 tooManyRequests
    ...suspended=        status 9 publicAccountSuspended
    ...http-503=         HTTP 503 with Retry-After (an outage in front of the API)
    ...silent=           accepted, then no receipt at all (blocked the bot, phone off)
    ...failed=           accepted, then a `failed` event with a desc
    ...seen=             accepted, then `delivered` and `seen`
    other                accepted, then `delivered`
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.simulators.server import LocalServer

DEFAULT_AUTH_TOKEN = "4453b6ac12345678-e02c5f12174805f9-daec9cbb5448c51f"
CHAT_HOSTNAME = "SN-CHAT-05_"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_TEXT_CHARS = 7000
MAX_SENDER_NAME_CHARS = 28
MAX_TRACKING_DATA_CHARS = 4096
CALLBACKS_TIMEOUT_SECONDS = 5.0


class SimulatedReceiver(StrEnum):
    """Subscriber ids that select a simulator behaviour (any id with the same ending does)."""

    DELIVERED = "sim-delivered="
    SEEN = "sim-seen="
    FAILED = "sim-failed="
    SILENT = "sim-silent="
    NOT_REGISTERED = "sim-not-registered="
    NOT_SUBSCRIBED = "sim-not-subscribed="
    OLD_DEVICE = "sim-old-device="
    THROTTLED = "sim-throttled="
    SUSPENDED = "sim-suspended="
    SERVER_ERROR = "sim-http-503="


# Ending of the receiver id -> (Viber status, status_message).
REFUSALS: Mapping[str, tuple[int, str]] = {
    "not-registered=": (5, "receiverNotRegistered"),
    "not-subscribed=": (6, "receiverNotSubscribed"),
    "old-device=": (11, "receiverNoSuitableDevice"),
    "throttled=": (12, "tooManyRequests"),
    "suspended=": (9, "publicAccountSuspended"),
}
RECEIPTS: Mapping[str, tuple[str, ...]] = {
    "silent=": (),
    "failed=": ("failed",),
    "seen=": ("delivered", "seen"),
}
DEFAULT_RECEIPTS = ("delivered",)
FAILED_DESC = "Message could not be delivered: receiver's client rejected the message"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class SentCallback:
    """One webhook request as the simulator sent it, and how the receiver answered."""

    url: str
    headers: Mapping[str, str]
    body: bytes
    response_status: int | None  # None: not reachable, or not a loopback URL
    answer: bytes = b""  # the receiver's response body

    def json(self) -> Any:
        return json.loads(self.body)

    def answer_json(self) -> Any:
        return json.loads(self.answer)


class ViberSimulator:
    def __init__(
        self,
        *,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        webhook_url: str | None = None,
        clock: Callable[[], float] = time.time,
        retry_after_seconds: int = 2,
        callback_delay_seconds: float = 0.0,
    ) -> None:
        self.auth_token = auth_token
        self.webhook_url = webhook_url
        self.clock = clock
        self.retry_after_seconds = retry_after_seconds
        self.callback_delay_seconds = callback_delay_seconds
        self.requests: list[RecordedRequest] = []
        self.callbacks: list[SentCallback] = []
        self._reporting: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(timeout=5.0)
        self._server = LocalServer(
            Starlette(
                routes=[
                    Route("/pa/send_message", self._send_message, methods=["POST"]),
                    Route("/pa/set_webhook", self._set_webhook, methods=["POST"]),
                ]
            )
        )

    @property
    def base_url(self) -> str:
        return self._server.base_url

    async def __aenter__(self) -> Self:
        await self._server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for task in self._reporting:
            task.cancel()
        await asyncio.gather(*self._reporting, return_exceptions=True)
        await self._server.stop()
        await self._http.aclose()

    def reset(self) -> None:
        """Forget requests and callbacks; stop reporting receipts not yet sent."""
        for task in self._reporting:
            task.cancel()
        self.requests.clear()
        self.callbacks.clear()

    async def wait_for_callbacks(self) -> None:
        """Wait until every receipt scheduled so far has been POSTed."""
        pending = [task for task in self._reporting if not task.cancelling()]
        async with asyncio.timeout(CALLBACKS_TIMEOUT_SECONDS):
            await asyncio.gather(*pending)

    def sign(self, body: bytes) -> str:
        """The `X-Viber-Content-Signature` Viber sends with `body`."""
        return hmac.new(self.auth_token.encode(), body, hashlib.sha256).hexdigest()

    def event_payload(
        self, event: str, message_token: int, user_id: str, *, desc: str | None = None
    ) -> dict[str, Any]:
        """A receipt event in Viber's shape (timestamp in Unix milliseconds)."""
        payload: dict[str, Any] = {
            "event": event,
            "timestamp": int(self.clock() * 1000),
            "chat_hostname": CHAT_HOSTNAME,
            "message_token": message_token,
            "user_id": user_id,
        }
        if desc is not None:
            payload["desc"] = desc
        return payload

    def message_payload(
        self, sender_id: str, text: str, *, message_token: int | None = None
    ) -> dict[str, Any]:
        """A subscriber's text message to the bot, as Viber's `message` callback."""
        return {
            "event": "message",
            "timestamp": int(self.clock() * 1000),
            "chat_hostname": CHAT_HOSTNAME,
            "message_token": message_token or secrets.randbelow(2**62) + 2**60,
            "sender": {
                "id": sender_id,
                "name": "Sim Subscriber",
                "avatar": "https://avatar.example.com/sim.jpg",
                "country": "PL",
                "language": "pl",
                "api_version": 10,
            },
            "message": {"type": "text", "text": text},
            "silent": False,
        }

    async def send_text(self, sender_id: str, text: str) -> SentCallback:
        """A subscriber's text message, signed and POSTed to the bot's one webhook."""
        return await self.post_callback(self.message_payload(sender_id, text))

    async def post_callback(
        self,
        payload: Mapping[str, Any],
        url: str | None = None,
        *,
        auth_token: str | None = None,
    ) -> SentCallback:
        """Sign and POST `payload` to the webhook the way Viber does (`auth_token`: sign
        with another token, as a forger would)."""
        target = url or self.webhook_url
        if target is None:
            raise RuntimeError("no webhook_url set")
        body = json.dumps(payload).encode()
        signature = (
            self.sign(body)
            if auth_token is None
            else hmac.new(auth_token.encode(), body, hashlib.sha256).hexdigest()
        )
        headers = {"content-type": "application/json", "x-viber-content-signature": signature}
        return await self._post(SentCallback(target, headers, body, None))

    async def redeliver(self, sent: SentCallback) -> SentCallback:
        """POST a callback again, same bytes and signature (Viber retries unanswered ones)."""
        return await self._post(sent)

    async def _post(self, callback: SentCallback) -> SentCallback:
        status: int | None = None
        answer = b""
        # Tests never reach the network: a non-local webhook is recorded, not called.
        if urlsplit(callback.url).hostname in LOOPBACK_HOSTS:
            try:
                response = await self._http.post(
                    callback.url, content=callback.body, headers=dict(callback.headers)
                )
                status, answer = response.status_code, response.content
            except httpx.HTTPError:
                status = None
        sent = SentCallback(callback.url, callback.headers, callback.body, status, answer)
        self.callbacks.append(sent)
        return sent

    async def _send_message(self, request: Request) -> Response:
        body = await request.body()
        headers = {key.lower(): value for key, value in request.headers.items()}
        self.requests.append(RecordedRequest(request.method, request.url.path, headers, body))
        token = headers.get("x-viber-auth-token")
        if not token:
            return _status(2, "Missing auth_token")
        if not hmac.compare_digest(token.encode(), self.auth_token.encode()):
            return _status(2, "invalidAuthToken")
        try:
            payload = json.loads(body)
        except ValueError:
            return _status(3, "badData")
        problem = _payload_problem(payload)
        if problem is not None:
            return _status(*problem)

        receiver: str = payload["receiver"]
        if receiver.endswith("http-503="):
            return JSONResponse(
                {"error": "Service Unavailable"},
                status_code=503,
                headers={"Retry-After": str(self.retry_after_seconds)},
            )
        for ending, (status, message) in REFUSALS.items():
            if receiver.endswith(ending):
                return _status(status, message)

        message_token = secrets.randbelow(2**62) + 2**60  # above 2**53, as real tokens are
        events = next(
            (events for ending, events in RECEIPTS.items() if receiver.endswith(ending)),
            DEFAULT_RECEIPTS,
        )
        if events and self.webhook_url is not None:
            task = asyncio.create_task(self._report(message_token, receiver, events))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)
        return JSONResponse(
            {
                "status": 0,
                "status_message": "ok",
                "message_token": message_token,
                "chat_hostname": CHAT_HOSTNAME,
            }
        )

    async def _report(self, message_token: int, receiver: str, events: tuple[str, ...]) -> None:
        for event in events:
            await asyncio.sleep(self.callback_delay_seconds)
            desc = FAILED_DESC if event == "failed" else None
            await self.post_callback(self.event_payload(event, message_token, receiver, desc=desc))

    async def _set_webhook(self, request: Request) -> Response:
        body = await request.body()
        headers = {key.lower(): value for key, value in request.headers.items()}
        self.requests.append(RecordedRequest(request.method, request.url.path, headers, body))
        if headers.get("x-viber-auth-token") != self.auth_token:
            return _status(2, "invalidAuthToken")
        try:
            payload = json.loads(body)
        except ValueError:
            return _status(3, "badData")
        url = payload.get("url") if isinstance(payload, dict) else None
        if not isinstance(url, str):
            return _status(4, "missingData")
        if not url:
            self.webhook_url = None  # an empty url removes the webhook
            return _status(0, "ok")
        check = await self.post_callback(
            {
                "event": "webhook",
                "timestamp": int(self.clock() * 1000),
                "chat_hostname": CHAT_HOSTNAME,
                "message_token": secrets.randbelow(2**62) + 2**60,
            },
            url,
        )
        if check.response_status != 200:
            return _status(1, "invalidUrl")
        self.webhook_url = url
        event_types = payload.get("event_types") or ["delivered", "seen", "failed", "subscribed"]
        return JSONResponse(
            {
                "status": 0,
                "status_message": "ok",
                "event_types": event_types,
                "chat_hostname": CHAT_HOSTNAME,
            }
        )


def _payload_problem(payload: Any) -> tuple[int, str] | None:
    if not isinstance(payload, dict):
        return 3, "badData"
    receiver, sender, kind = payload.get("receiver"), payload.get("sender"), payload.get("type")
    if not isinstance(receiver, str) or not receiver:
        return 4, "missingData: receiver"
    if not isinstance(sender, dict) or not isinstance(sender.get("name"), str):
        return 4, "missingData: sender.name"
    if not sender["name"] or len(sender["name"]) > MAX_SENDER_NAME_CHARS:
        return 3, "badData: sender.name must be 1-28 characters"
    if kind != "text":
        return 3, f"badData: unsupported type {kind!r}"
    text = payload.get("text")
    if not isinstance(text, str) or not text:
        return 4, "missingData: text"
    if len(text) > MAX_TEXT_CHARS:
        return 3, "badData: text is too long"
    tracking = payload.get("tracking_data")
    if tracking is not None and (
        not isinstance(tracking, str) or len(tracking) > MAX_TRACKING_DATA_CHARS
    ):
        return 3, "badData: tracking_data must be a string of at most 4096 characters"
    return None


def _status(status: int, message: str) -> JSONResponse:
    """Viber reports errors in the body with HTTP 200."""
    return JSONResponse({"status": status, "status_message": message})
