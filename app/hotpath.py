"""The two requests that come by the thousand a second, served without the framework.

`POST /v1/messages` and `POST /v1/providers/{provider}/status` are answered here, inside
the request-id/metrics and body-size middleware, without FastAPI's routing, dependency
resolution and response-model encoding (together more CPU than the work itself). Only
the plain case is served here: a handler returns None for anything else (a key not yet
known to this process, a body that does not validate, a bad signature, …) and the
request goes on, body replayed, to the FastAPI route, which declares the operation in
the OpenAPI document and gives every refusal its usual answer. Both routes do the same
work through the same writers, so the fast path changes the cost, never the outcome.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.asgi import read_body, replay_body
from app.runtime import Runtime

# (scope, body, runtime) → the response, or None to let the FastAPI route answer.
Handler = Callable[[Scope, bytes, Runtime], Awaitable[Response | None]]


class JSONBytes(Response):
    """A response whose JSON is already encoded."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int, headers: dict[str, str] | None) -> None:
        # Starlette's init, minus the rendering: the body is final.
        self.status_code = status_code
        self.body = body
        self.background = None
        self.init_headers(headers)


class HotPaths:
    def __init__(
        self, app: ASGIApp, exact: dict[str, Handler], status_callbacks: Handler | None = None
    ) -> None:
        self.app = app
        self.exact = exact
        self.status_callbacks = status_callbacks
        self._routes: dict[str, Any] = {}

    def _handler(self, path: str) -> tuple[Handler, str] | None:
        handler = self.exact.get(path)
        if handler is not None:
            return handler, path
        if (
            self.status_callbacks is not None
            and path.startswith("/v1/providers/")
            and path.endswith("/status")
            and path.count("/") == 4
        ):
            return self.status_callbacks, "/v1/providers/{provider}/status"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        found = self._handler(scope["path"])
        if found is None:
            await self.app(scope, receive, send)
            return
        handler, template = found
        body, ended = await read_body(receive)
        if ended is not None:
            return  # the client left before its body came
        runtime: Runtime = scope["app"].state.runtime
        response = await handler(scope, body, runtime)
        if response is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        # The route the metrics middleware labels the request with.
        scope["route"] = self._route(scope, template)
        await response(scope, receive, send)

    def _route(self, scope: Scope, template: str) -> Any:
        if template not in self._routes:
            self._routes[template] = next(
                (r for r in scope["app"].routes if getattr(r, "path", None) == template), None
            )
        return self._routes[template]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The header's value when it is given exactly once; None when absent or repeated."""
    found = None
    for key, value in scope["headers"]:
        if key == name:
            if found is not None:
                return None
            found = value
    return found
