"""What a send costs at one provider account: the account's `price` table, in Decimal.

    [providers.price]
    currency = "EUR"
    per_message = "0.002"            # every channel but SMS (SMS: when no segment price)
    per_segment = "0.05"             # SMS: per segment, where no prefix matches
    prefixes = { "+48" = "0.031", "+1" = "0.0079" }   # per destination, longest prefix wins
    pricing_categories = { marketing = "0.0412", utility = "0.0085" }   # receipts' pricing
    [providers.price.channels.push]  # an account serving several channels (the sandbox)
    per_message = "0.0001"

Amounts are strings (or integers): a TOML float is refused, since 0.1 is not 0.1 in
binary. An account with no price (or no price that applies) costs None, never 0.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from providers.base import Channel, ReportedPrice


def _exact(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError('write prices as strings ("0.031"): a float is not exact')
    return value


Amount = Annotated[Decimal, BeforeValidator(_exact), Field(ge=0, allow_inf_nan=False)]


class ChannelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_message: Amount | None = None
    per_segment: Amount | None = None
    prefixes: dict[str, Amount] = {}
    # What a receipt's pricing category costs (WhatsApp's `pricing.category`).
    pricing_categories: dict[str, Amount] = {}

    def unit(self, address: str | None) -> Decimal | None:
        """The price of one message (SMS: one segment) to `address`."""
        if address is not None and self.prefixes:
            matches = [p for p in self.prefixes if address.startswith(p)]
            if matches:
                return self.prefixes[max(matches, key=len)]
        return self.per_segment if self.per_segment is not None else self.per_message

    def cost(self, channel: Channel, address: str | None, segments: int | None) -> Decimal | None:
        """What one send costs: SMS per segment (`segments`, at least 1), else per message."""
        unit = self.unit(address)
        if unit is None:
            return None
        if channel is Channel.SMS and (self.per_segment is not None or self.prefixes):
            return unit * max(1, segments or 1)
        return unit


class Price(ChannelPrice):
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    channels: dict[Channel, ChannelPrice] = {}

    def on(self, channel: Channel) -> ChannelPrice:
        return self.channels.get(channel, self)

    def estimate(
        self, channel: Channel, address: str | None, segments: int | None
    ) -> Decimal | None:
        """What one send on `channel` to `address` costs (None: no price applies)."""
        return self.on(channel).cost(channel, address, segments)

    def reported(
        self, channel: Channel, reported: ReportedPrice, estimate: Decimal | None
    ) -> Decimal | None:
        """The cost a receipt's pricing says (in place of `estimate`): its amount when in
        our currency, 0 when not billable, its pricing category's price when listed."""
        if reported.amount is not None and reported.currency == self.currency:
            return reported.amount
        if reported.billable is False:
            return Decimal(0)
        categories = self.on(channel).pricing_categories
        if reported.category is not None and reported.category in categories:
            return categories[reported.category]
        return estimate
