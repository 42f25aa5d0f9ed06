"""The cascade's one side job on arq: withdrawing a send the cascade gave up on.

Sending itself is the delivery engine's (`app/cascade/engine.py`), not a job per message.
"""

from __future__ import annotations

from typing import Any

import structlog

from app.runtime import Runtime
from providers.base import Cancellable, ProviderError
from providers.registry import UnknownProvider

log = structlog.get_logger()


async def cancel_provider_send(
    ctx: dict[str, Any], provider: str, provider_message_id: str
) -> None:
    """Withdraw a send the cascade gave up on, where the provider's API can (best effort)."""
    rt: Runtime = ctx["runtime"]
    try:
        adapter = rt.providers.for_callbacks(provider)
    except UnknownProvider:
        return
    if not isinstance(adapter, Cancellable):
        return  # the provider has no way to recall a send: nothing to do
    try:
        cancelled = await adapter.cancel(provider_message_id)
    except (ProviderError, OSError, TimeoutError) as exc:
        log.warning("provider_cancel_failed", provider=provider, error=repr(exc))
        return
    log.info("provider_cancel", provider=provider, cancelled=cancelled)
