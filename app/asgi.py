"""Request bodies for the middlewares that must read one before the app does."""

from __future__ import annotations

from starlette.types import Message, Receive


async def read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole body, and what ended it early (a disconnect), if anything did."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), None


def replay_body(body: bytes, receive: Receive, rest: Message | None = None) -> Receive:
    """A `receive` for the app that gives it `body` whole, then `rest` (what ended the read
    early), then whatever the client sends next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent, rest
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if rest is not None:
            message, rest = rest, None
            return message
        return await receive()

    return replay
