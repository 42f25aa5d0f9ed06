"""Receipt tokens: what a device presents to confirm a push (no API key on devices).

A token is `rct1.<kid>.<mac>`: the MAC is HMAC-SHA256 over the key id and the public
message id, keyed by that key's secret from `CASCADE_RECEIPT_KEYS` (never the API key
pepper). The first listed key signs and every listed key verifies, so a key is rotated by
listing a new one first and removing the old one once its pushes are past.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

TOKEN_VERSION = "rct1"
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MAC_BYTES = 24


class ReceiptTokenRefused(Exception):
    """The token is not one this deployment signed for this message; the text says why."""


@dataclass(frozen=True, slots=True)
class ReceiptKeys:
    signing_kid: str
    secrets: Mapping[str, bytes] = field(repr=False)

    @classmethod
    def parse(cls, value: str) -> ReceiptKeys:
        """`kid:secret[,kid:secret…]`, the signing key first; ValueError when malformed."""
        secrets: dict[str, bytes] = {}
        for entry in (part.strip() for part in value.split(",")):
            kid, colon, secret = entry.partition(":")
            if not colon or not KEY_ID.fullmatch(kid) or not secret:
                raise ValueError(
                    "receipt keys are `kid:secret` entries separated by commas"
                    " (kid: 1-32 of A-Z a-z 0-9 _ -; secret: not empty)"
                )
            if kid in secrets:
                raise ValueError(f"receipt key id {kid!r} is listed twice")
            secrets[kid] = secret.encode()
        return cls(next(iter(secrets)), secrets)


def _mac(secret: bytes, kid: str, message_id: str) -> str:
    digest = hmac.new(secret, f"receipt:v1:{kid}:{message_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:_MAC_BYTES]).decode().rstrip("=")


def receipt_token(keys: ReceiptKeys, message_id: str) -> str:
    """The token for `message_id`, signed with the first (current) key."""
    kid = keys.signing_kid
    return f"{TOKEN_VERSION}.{kid}.{_mac(keys.secrets[kid], kid, message_id)}"


def check_receipt_token(keys: ReceiptKeys, message_id: str, token: str) -> None:
    """Raise ReceiptTokenRefused unless `token` was signed for `message_id` by a listed key."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        raise ReceiptTokenRefused(
            f"the receipt token is not in the current format ({TOKEN_VERSION}.<key id>.<mac>)"
        )
    _, kid, mac = parts
    secret = keys.secrets.get(kid)
    if secret is None:
        raise ReceiptTokenRefused("the receipt token's signing key is no longer accepted")
    # Bytes, not str: compare_digest refuses non-ASCII text (a header is decoded as Latin-1).
    if not hmac.compare_digest(_mac(secret, kid, message_id).encode(), mac.encode()):
        raise ReceiptTokenRefused("the receipt token does not match this message")
