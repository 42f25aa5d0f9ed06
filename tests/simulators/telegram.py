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

Telegram sends no delivery or read receipts, so there is nothing to post back.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.simulators.server import LocalServer

_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]+")
_PARSE_MODES = frozenset({"HTML", "Markdown", "MarkdownV2"})
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
        self._message_ids = itertools.count(1)
        self._server = LocalServer(
            Starlette(routes=[Route("/bot{token}/{method}", self._call, methods=["GET", "POST"])])
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
        if request.path_params["method"] == "sendMessage":
            return self._send_message(params)
        return _error(404, "Not Found")

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
