"""Which provider account sends a step.

A cascade step names a provider by route (an account's alias, or its type) or by account
name; among the accounts that match, one dedicated to the message's category wins over a
general one. Callbacks arrive per account name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from providers.accounts import AdapterContext, ProviderAccount, build_adapters
from providers.base import Category, Channel, Provider, SessionProvider
from providers.pricing import Price


class UnknownProvider(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    account: ProviderAccount


class ProviderRegistry:
    def __init__(
        self,
        routes: Iterable[Route],
        defaults: Mapping[Channel, str],
        context: AdapterContext | None = None,
    ) -> None:
        self._routes = list(routes)
        self._context = context  # owns the accounts' HTTP clients
        self._by_name: dict[str, Route] = {}
        for route in self._routes:
            self._by_name.setdefault(route.provider.name, route)
        self._defaults = dict(defaults)
        # The routes never change once built: each (channel, ref, category) is looked up
        # once (accepting a message resolves every step of its cascade).
        self._chosen: dict[tuple[Channel, str | None, Category], Route] = {}

    @classmethod
    def from_accounts(
        cls,
        accounts: Iterable[ProviderAccount],
        defaults: Mapping[Channel, str],
        context: AdapterContext,
    ) -> ProviderRegistry:
        routes = [
            Route(provider, account)
            for account in accounts
            for provider in build_adapters(account, context)
        ]
        return cls(routes, defaults, context)

    def route(self, channel: Channel, ref: str | None, category: Category) -> Route:
        """The account for a step: `ref` (or the channel default) narrowed by category."""
        key = (channel, ref, category)
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._chosen[key] = self._choose(channel, ref, category)
        return chosen

    def _choose(self, channel: Channel, ref: str | None, category: Category) -> Route:
        wanted = ref or self._defaults.get(channel, "")
        candidates = [
            r
            for r in self._routes
            if r.provider.channel == channel
            and wanted in (r.provider.name, r.account.route)
            and r.account.serves(category)
        ]
        if candidates:
            # Dedicated to this category first, then the account of that very name.
            return min(
                candidates,
                key=lambda r: (not r.account.categories, r.provider.name != wanted),
            )
        raise UnknownProvider(
            f"no provider {wanted!r} for channel {channel.value} and category {category.value}"
        )

    def get(self, channel: Channel, ref: str | None, category: Category) -> Provider:
        return self.route(channel, ref, category).provider

    def account(self, name: str) -> ProviderAccount:
        return self._by_name[name].account

    @property
    def currency(self) -> str | None:
        """The one currency of every priced account (None: none is priced)."""
        return next((r.account.price.currency for r in self._routes if r.account.price), None)

    def price(self, name: str) -> Price | None:
        """The price table of the account named `name` (None: unpriced or unknown)."""
        route = self._by_name.get(name)
        return route.account.price if route is not None else None

    def for_callbacks(self, name: str) -> Provider:
        """The provider whose status callbacks arrive at `/v1/providers/{name}/status`."""
        try:
            return self._by_name[name].provider
        except KeyError:
            raise UnknownProvider(f"no provider {name!r}") from None

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    async def connect_sessions(self) -> None:
        """Open session-based providers (SMPP binds) now: receipts queued at the provider
        arrive before the first send. Workers call this; the API never binds."""
        for route in self._routes:
            if isinstance(route.provider, SessionProvider):
                await route.provider.start()

    async def aclose(self) -> None:
        for route in self._routes:
            await route.provider.aclose()
        if self._context is not None:
            await self._context.aclose()
