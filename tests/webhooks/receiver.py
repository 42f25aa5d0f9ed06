"""An integrator's webhook receiver on 127.0.0.1: verifies Standard Webhooks signatures
with the `standardwebhooks` library, records every request, answers as told.

    async with Receiver() as receiver:           # listening
        receiver.secrets = [created["secret"]]    # then every request must verify
        receiver.answer = 500                     # or fail on purpose
        await receiver.wait_for(3)

`Receiver(start=False)` binds the port but does not listen (connections are refused)
until `await receiver.start()`: a receiver that is down, then up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.simulators.server import LocalServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.body)
        return data

    @property
    def type(self) -> str:
        return str(self.payload["type"])

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.payload["data"]
        return data


@dataclass
class Receiver:
    start_now: bool = True
    # Secrets the receiver verifies with (any one must match); empty: record only.
    secrets: list[str] = field(default_factory=list)
    answer: int = 200
    answer_body: str = "ok"
    answer_headers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = LocalServer(
            Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])
        )
        self._arrived = asyncio.Condition()

    def url(self, path: str = "/hook") -> str:
        return self._server.base_url + path

    async def start(self) -> None:
        await self._server.start()

    async def __aenter__(self) -> Self:
        if self.start_now:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._server.stop()

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        verified = any(_verifies(secret, body, headers) for secret in self.secrets)
        async with self._arrived:
            self.received.append(Received(request.url.path, headers, body, verified))
            self._arrived.notify_all()
        if self.answer != 200:
            return PlainTextResponse(self.answer_body, self.answer, self.answer_headers)
        if self.secrets and not verified:
            return PlainTextResponse("bad signature", 401)
        return PlainTextResponse(self.answer_body, 200, self.answer_headers)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_for(
        self, count: int, path: str = "/hook", within: float = 10.0
    ) -> list[Received]:
        """The first `count` requests to `path`, waiting for them to arrive."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.on(path)) >= count)
        return self.on(path)[:count]


def _verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True
