"""The webhooks' receiving server, for the `inbound.received` tests."""

from tests.webhooks.conftest import receiver

__all__ = ["receiver"]
