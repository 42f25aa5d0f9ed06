"""Standard Webhooks signatures: `v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>`."""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Sequence
from datetime import datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(webhook_id: str, at: datetime, body: str, keys: Sequence[str]) -> dict[str, str]:
    """The three Standard Webhooks headers; several keys (rotation) give space-separated
    signatures, any one of which a receiver accepts."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(math.floor(at.timestamp())),
        "webhook-signature": " ".join(Webhook(key).sign(webhook_id, at, body) for key in keys),
    }
