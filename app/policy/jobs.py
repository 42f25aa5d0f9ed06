"""Policy housekeeping: forget marketing sends older than any cap window or STOP lookup."""

from __future__ import annotations

from typing import Any

import structlog

from app.policy import service
from app.runtime import Runtime, utcnow

log = structlog.get_logger()


async def prune_marketing_sends(ctx: dict[str, Any]) -> None:
    runtime: Runtime = ctx["runtime"]
    async with runtime.transaction() as tx:
        pruned = await service.prune_marketing_sends(
            tx, utcnow() - runtime.settings.marketing_log_retention
        )
        pruned += await service.prune_fingerprints(tx, utcnow() - service.MAX_DEDUPE_WINDOW)
    if pruned:
        log.info("marketing_sends_pruned", rows=pruned)
