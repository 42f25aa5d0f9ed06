"""What every HTTP adapter reads the same way from a provider's answer."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2

from providers.base import TransientProviderError

# Failures before the request reached the provider: nothing can have been sent.
_NOT_SENT = (
    httpx2.ConnectError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
    httpx2.WriteError,
    httpx2.WriteTimeout,
    httpx2.LocalProtocolError,
    httpx2.UnsupportedProtocol,
    httpx2.ProxyError,
)


def transport_error(
    prefix: str, exc: httpx2.TransportError, *, idempotent: bool = False
) -> TransientProviderError:
    """A transport failure as the transient error every adapter raises: `<prefix>:timeout`
    or `<prefix>:transport`. Unless the request was `idempotent`, one that may have reached
    the provider (no answer after it was written: a read timeout, a dropped connection) is
    `maybe_sent`, so it is not sent again."""
    kind = "timeout" if isinstance(exc, httpx2.TimeoutException) else "transport"
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return TransientProviderError(
        f"{prefix}:{kind}",
        detail,
        maybe_sent=not idempotent and not isinstance(exc, _NOT_SENT),
    )


def retry_after_seconds(response: httpx2.Response) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date (RFC 9110)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def json_object(response: httpx2.Response) -> dict[str, Any]:
    """The body as a JSON object, or {} when it is not one (HTML error pages, empty bodies)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
