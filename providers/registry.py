"""Which provider sends a step: looked up by (channel, name), with a default per channel."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from providers.base import Channel, Provider


class UnknownProvider(LookupError):
    pass


class ProviderRegistry:
    def __init__(self, providers: Iterable[Provider], defaults: Mapping[Channel, str]) -> None:
        self._by_key: dict[tuple[Channel, str], Provider] = {}
        self._by_name: dict[str, Provider] = {}
        for provider in providers:
            self._by_key[(provider.channel, provider.name)] = provider
            self._by_name.setdefault(provider.name, provider)
        self._defaults = dict(defaults)

    def get(self, channel: Channel, name: str | None = None) -> Provider:
        key = (channel, name or self._defaults.get(channel, ""))
        try:
            return self._by_key[key]
        except KeyError:
            raise UnknownProvider(f"no provider {key[1]!r} for channel {channel.value}") from None

    def for_callbacks(self, name: str) -> Provider:
        """The provider whose status callbacks arrive at `/v1/providers/{name}/status`."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownProvider(f"no provider {name!r}") from None

    def names(self, channel: Channel) -> list[str]:
        return sorted(name for ch, name in self._by_key if ch == channel)

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._by_key.values())

    async def aclose(self) -> None:
        for provider in self._by_key.values():
            await provider.aclose()
