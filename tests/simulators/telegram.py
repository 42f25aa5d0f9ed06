"""A Telegram Bot API simulator: a real HTTP server on 127.0.0.1 in the test's loop.

It answers `/bot<token>/sendMessage` like api.telegram.org: a well-formed but wrong
token gets 401 Unauthorized, a malformed one 404 Not Found; parameters come from
the query string, a form or a JSON body; answers are `{"ok": …}` envelopes.

What happens is chosen by the end of the chat id:

| ending | answer                                                        |
|--------|---------------------------------------------------------------|
| 403    | 403 "Forbidden: bot was blocked by the user"                  |
| 400    | 400 "Bad Request: chat not found"                             |
| 429    | 429 "Too Many Requests: retry after 1", parameters.retry_after |
| 502    | 502 from the front proxy (HTML, not JSON)                     |
| other  | 200 with the sent Message                                     |

Telegram sends no delivery or read receipts. What users send the bot comes back as
Updates: `setWebhook` registers the URL, `secret_token` and `allowed_updates` (checked
as Telegram does: HTTPS on ports 443, 80, 88 or 8443, the secret 1-256 of A-Z a-z 0-9 _
-; one deviation: plain http to 127.0.0.1, where the tests' service listens), and
`deliver` POSTs an Update there as JSON with `X-Telegram-Bot-Api-Secret-Token`, only
for a type in `allowed_updates`. `forge` posts one with any (or no) secret, as a
stranger could. The exact wording of Telegram's setWebhook errors is *unverified*.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.simulators.server import LocalServer

_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]+")
_PARSE_MODES = frozenset({"HTML", "Markdown", "MarkdownV2"})
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_WEBHOOK_PORTS = frozenset({80, 88, 443, 8443})
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_BAD_GATEWAY = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.18.0</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names, as received
    params: dict[str, Any]  # query, form and JSON parameters merged, as Telegram reads them
    body: bytes


@dataclass(frozen=True)
class Webhook:
    """What setWebhook registered."""

    url: str
    secret_token: str | None
    allowed_updates: tuple[str, ...]  # empty: every type except chat_member & co.
    max_connections: int = 40


@dataclass(frozen=True)
class SentUpdate:
    """One Update as the simulator posted it, and the receiver's answer."""

    url: str
    headers: dict[str, str]
    body: bytes
    status_code: int
    response: bytes

    def json(self) -> Any:
        return json.loads(self.response)


class TelegramSimulator:
    def __init__(
        self,
        *,
        bot_token: str = "123456789:AAHsim-bot-token_0123456789abcdef",
        bot_username: str = "cascade_sim_bot",
    ) -> None:
        if not _TOKEN.fullmatch(bot_token):
            raise ValueError("a bot token looks like <bot id>:<secret>")
        self.bot_token = bot_token
        self.bot_id = int(bot_token.split(":", 1)[0])
        self.bot_username = bot_username
        self.requests: list[RecordedRequest] = []
        self.webhook: Webhook | None = None
        self.updates: list[SentUpdate] = []
        self._message_ids = itertools.count(1)
        self._update_ids = itertools.count(712_000_001)
        self._http: httpx.AsyncClient | None = None
        self._server = LocalServer(
            Starlette(routes=[Route("/bot{token}/{method}", self._call, methods=["GET", "POST"])])
        )
        self.base_url = ""

    async def __aenter__(self) -> Self:
        self.base_url = await self._server.start()
        self._http = httpx.AsyncClient(timeout=10)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.aclose()
        await self._server.stop()

    async def _call(self, request: Request) -> Response:
        body = await request.body()
        params = _params(request, body)
        self.requests.append(
            RecordedRequest(
                request.method, request.url.path, dict(request.headers), params or {}, body
            )
        )
        token = request.path_params["token"]
        if not _TOKEN.fullmatch(token):
            return _error(404, "Not Found")
        if token != self.bot_token:
            return _error(401, "Unauthorized")
        if params is None:
            return _error(400, "Bad Request: can't parse JSON object")
        method = request.path_params["method"]
        if method == "sendMessage":
            return self._send_message(params)
        if method == "setWebhook":
            return self._set_webhook(params)
        if method == "getWebhookInfo":
            return self._webhook_info()
        return _error(404, "Not Found")

    def _set_webhook(self, params: dict[str, Any]) -> Response:
        url = params.get("url")
        if not isinstance(url, str):
            return _error(400, 'Bad Request: parameter "url" is required')
        if url == "":
            deleted = self.webhook is None
            self.webhook = None
            return _ok(True, "Webhook is already deleted" if deleted else "Webhook was deleted")
        problem = _webhook_url_problem(url)
        if problem is not None:
            return _error(400, f"Bad Request: bad webhook: {problem}")
        secret = params.get("secret_token")
        if secret is not None and not (isinstance(secret, str) and _SECRET_TOKEN.fullmatch(secret)):
            return _error(400, "Bad Request: secret token contains unallowed characters")
        allowed = params.get("allowed_updates", [])
        if isinstance(allowed, str):  # a form or query sends it JSON-serialized
            try:
                allowed = json.loads(allowed) if allowed else []
            except ValueError:
                allowed = None
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            return _error(400, "Bad Request: can't parse allowed updates")
        webhook = Webhook(url, secret or None, tuple(allowed))
        unchanged = webhook == self.webhook
        self.webhook = webhook
        return _ok(True, "Webhook is already set" if unchanged else "Webhook was set")

    def _webhook_info(self) -> Response:
        if self.webhook is None:
            return _ok({"url": "", "has_custom_certificate": False, "pending_update_count": 0})
        info: dict[str, Any] = {
            "url": self.webhook.url,
            "has_custom_certificate": False,
            "pending_update_count": 0,
            "max_connections": self.webhook.max_connections,
        }
        if self.webhook.allowed_updates:
            info["allowed_updates"] = list(self.webhook.allowed_updates)
        return _ok(info)

    # --- updates: what users send the bot ---------------------------------------------

    def text_update(
        self,
        chat_id: int,
        text: str,
        *,
        kind: str = "message",
        chat_type: str = "private",
        username: str | None = None,
        edited: bool = False,
    ) -> dict[str, Any]:
        """An Update of `kind` (message, edited_message, channel_post) carrying `text`."""
        now = int(time.time())
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = "Sim"
        else:
            chat["title"] = f"Sim {chat_type}"
        if username is not None:
            chat["username"] = username
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "chat": chat,
            "date": now - 60 if edited else now,
            "text": text,
        }
        if chat_type == "channel":
            message["sender_chat"] = chat
        else:
            sender = chat_id if chat_type == "private" else 5_550_001
            message["from"] = {"id": sender, "is_bot": False, "first_name": "Sim"}
        if edited:
            message["edit_date"] = now
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        return self.update(kind, message)

    def update(self, kind: str, value: dict[str, Any]) -> dict[str, Any]:
        """An Update of any type, e.g. `my_chat_member`, with the next update_id."""
        return {"update_id": next(self._update_ids), kind: value}

    async def deliver(self, update: dict[str, Any]) -> SentUpdate:
        """POST `update` to the webhook as Telegram does: with the registered secret."""
        if self.webhook is None:
            raise RuntimeError("no webhook is set: call setWebhook first")
        kind = next(key for key in update if key != "update_id")
        allowed = self.webhook.allowed_updates
        if allowed and kind not in allowed:
            raise ValueError(f"Telegram sends no {kind} update with allowed_updates {allowed}")
        return await self._post(self.webhook.url, update, self.webhook.secret_token)

    async def forge(self, update: dict[str, Any], secret_token: str | None) -> SentUpdate:
        """POST `update` to the webhook with `secret_token` (None: no header) instead."""
        if self.webhook is None:
            raise RuntimeError("no webhook is set: call setWebhook first")
        return await self._post(self.webhook.url, update, secret_token)

    async def _post(self, url: str, update: dict[str, Any], secret: str | None) -> SentUpdate:
        assert self._http is not None, "the simulator is not started"
        body = json.dumps(update, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"content-type": "application/json"}
        if secret is not None:
            headers[SECRET_HEADER] = secret
        response = await self._http.post(url, content=body, headers=headers)
        sent = SentUpdate(url, headers, body, response.status_code, response.content)
        self.updates.append(sent)
        return sent

    def _send_message(self, params: dict[str, Any]) -> Response:
        chat_id = params.get("chat_id")
        text = params.get("text")
        parse_mode = params.get("parse_mode")
        if chat_id is None or chat_id == "":
            return _error(400, "Bad Request: chat_id is empty")
        if not isinstance(text, str) or not text:
            return _error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return _error(400, "Bad Request: message is too long")
        if parse_mode is not None and parse_mode not in _PARSE_MODES:
            return _error(400, f"Bad Request: unsupported parse_mode {parse_mode!r}")

        chat = str(chat_id)
        if chat.endswith("403"):
            return _error(403, "Forbidden: bot was blocked by the user")
        if chat.endswith("400"):
            return _error(400, "Bad Request: chat not found")
        if chat.endswith("429"):
            return _error(429, "Too Many Requests: retry after 1", {"retry_after": 1})
        if chat.endswith("502"):
            return HTMLResponse(_BAD_GATEWAY, status_code=502)

        is_channel = chat.startswith("@")
        chat_object: dict[str, Any] = (
            {"id": -1001000000000, "title": chat, "username": chat[1:], "type": "channel"}
            if is_channel
            else {"id": int(chat), "first_name": "Sim", "type": "private"}
        )
        return JSONResponse(
            {
                "ok": True,
                "result": {
                    "message_id": next(self._message_ids),
                    "from": {
                        "id": self.bot_id,
                        "is_bot": True,
                        "first_name": "Cascade Sim",
                        "username": self.bot_username,
                    },
                    "chat": chat_object,
                    "date": int(time.time()),
                    "text": text,
                },
            }
        )


def _webhook_url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme == "http" and parts.hostname == "127.0.0.1":
        return None  # the simulator's one deviation: the tests' service is local
    if parts.scheme != "https" or not parts.hostname:
        return "An HTTPS URL must be provided for webhook"
    if (parts.port or 443) not in _WEBHOOK_PORTS:
        return "Webhook can be set up only on ports 80, 88, 443 or 8443"
    return None


def _ok(result: Any, description: str | None = None) -> JSONResponse:
    payload: dict[str, Any] = {"ok": True, "result": result}
    if description is not None:
        payload["description"] = description
    return JSONResponse(payload)


def _params(request: Request, body: bytes) -> dict[str, Any] | None:
    """Query, form or JSON parameters; None when a JSON body does not parse to an object."""
    params: dict[str, Any] = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            decoded = json.loads(body) if body else {}
        except ValueError:
            return None
        if not isinstance(decoded, dict):
            return None
        params.update(decoded)
    elif content_type.startswith("application/x-www-form-urlencoded"):
        params.update(parse_qsl(body.decode()))
    return params


def _error(code: int, description: str, parameters: dict[str, Any] | None = None) -> JSONResponse:
    payload: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters is not None:
        payload["parameters"] = parameters
    return JSONResponse(payload, status_code=code)
