"""One signed POST to a customer's endpoint, measured and bounded (the only HTTP here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import httpx

from app.webhooks.signing import signed_headers
from app.webhooks.ssrf import UnsafeUrl

TIMEOUT_SECONDS = 10.0
MAX_STORED_RESPONSE = 1024
USER_AGENT = "Cascade-Webhooks/1"


@dataclass(frozen=True, slots=True)
class Outcome:
    status_code: int | None
    latency_ms: int
    response_body: str | None
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


async def post_signed(
    client: httpx.AsyncClient,
    url: str,
    webhook_id: str,
    body: str,
    keys: Sequence[str],
    at: datetime,
    timeout_seconds: float = TIMEOUT_SECONDS,
) -> Outcome:
    """POST `body` signed with every key; a failure of any kind is in the outcome, not raised."""
    headers = {
        **signed_headers(webhook_id, at, body, keys),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    started = time.monotonic()
    status_code: int | None = None
    response_body: str | None = None
    error: str | None = None
    try:
        # One deadline for the whole exchange: connect, send, and the first KiB of answer.
        async with asyncio.timeout(timeout_seconds):
            async with client.stream("POST", url, content=body, headers=headers) as response:
                status_code = response.status_code
                response_body = await _read_prefix(response, MAX_STORED_RESPONSE)
    except TimeoutError:
        error = f"timed out after {timeout_seconds:g} s"
    except UnsafeUrl as exc:
        error = f"refused: {exc}"
    except Exception as exc:
        # Whatever the client raises (an HTTP error, a URL it cannot parse, a TLS or IDNA
        # error) is this attempt failing: retried on schedule, never a crashed job.
        error = f"{type(exc).__name__}: {exc}"[:500] if str(exc) else type(exc).__name__
    latency_ms = round((time.monotonic() - started) * 1000)
    if status_code is not None and not 200 <= status_code < 300 and error is None:
        error = f"HTTP {status_code}"
    return Outcome(status_code, latency_ms, response_body, error)


async def _read_prefix(response: httpx.Response, limit: int) -> str:
    """The first `limit` bytes of the answer; a receiver's huge body is not read on."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit].decode("utf-8", errors="replace")
