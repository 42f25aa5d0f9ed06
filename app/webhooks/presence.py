"""Which tenants have an enabled webhook endpoint, as one process last saw it."""

from __future__ import annotations

import time
import uuid

# A stale "no" only delays a tenant's events to the sweep; a stale "yes" costs a no-op
# dispatch job.
TENANT_CACHE_TTL_SECONDS = 5.0
_TENANT_CACHE_MAX = 10_000


class EndpointPresence:
    """Per process (on its `Runtime`, handed to each `Transaction` it opens)."""

    def __init__(self) -> None:
        self._tenants: dict[uuid.UUID, tuple[float, bool]] = {}
        # Bumped on every forget: an answer read while an endpoint changed is not kept.
        self.generation = 0

    def get(self, tenant_id: uuid.UUID) -> bool | None:
        cached = self._tenants.get(tenant_id)
        return cached[1] if cached is not None and cached[0] > time.monotonic() else None

    def remember(self, tenant_id: uuid.UUID, found: bool, generation: int) -> None:
        """`found` as read when `generation` was current; dropped if it no longer is (an
        endpoint changed while we looked: our snapshot may predate it)."""
        if generation != self.generation:
            return
        if len(self._tenants) >= _TENANT_CACHE_MAX:
            self._tenants.clear()
        self._tenants[tenant_id] = (time.monotonic() + TENANT_CACHE_TTL_SECONDS, found)

    def forget(self, tenant_id: uuid.UUID) -> None:
        self.generation += 1
        self._tenants.pop(tenant_id, None)
