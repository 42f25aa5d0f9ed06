"""Keeps customer-supplied URLs away from our own network.

Checked twice: at registration (scheme and every address the host resolves to) and at
connect time, where the HTTP client resolves the host itself, checks each address and
connects to the checked one. The URL keeps its hostname, so Host and TLS SNI/certificate
checks are the original ones, and a DNS answer that changes between registration and
delivery (rebinding) cannot point a delivery at an internal address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable

import certifi
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services: refused even where a broader rule would miss them.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
RESOLVE_TIMEOUT_SECONDS = 5.0


class UnsafeUrl(ValueError):
    """The URL may not be called: bad scheme, or a host that is not public."""


# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 4291, 2765, 6052).
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215: for networks' own translators, with the IPv4 at a position only they know.
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a tunnel or translator would reach through `ip` (6to4, Teredo,
    NAT64, IPv4-compatible or -translated)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip.is_unspecified or ip.is_loopback:
        return found
    if any(ip in net for net in (IPV4_COMPATIBLE, IPV4_TRANSLATED, NAT64_WELL_KNOWN)):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def address_refusal(ip: IPAddress, allow_loopback: bool) -> str | None:
    """Why we may not connect to `ip`, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL_USE:
            return "a local-use NAT64 address"
        for inner in embedded_ipv4(ip):
            # Through a tunnel even loopback is someone else's: never allowed inside.
            reason = address_refusal(inner, allow_loopback=False)
            if reason:
                return f"embeds {inner}, {reason}"
    if ip.is_loopback:
        return None if allow_loopback else "a loopback address"
    for refused, reason in (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    ):
        if refused:
            return reason
    return None


# Hosts made only of numbers (decimal, octal, hex), which parsers read as IPv4 each their
# own way: `01.1.1.1`, `0x7f.1`, `2130706433`, `1.1.1.1.`.
NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
HOST_NAME = re.compile(
    r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)


def normalized_host(host: str) -> str:
    """The host as it is connected to: an IP address in its canonical form, or a lowercase
    ASCII (IDNA) name; UnsafeUrl for what parsers could read differently."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return f"[{ip}]" if ip.version == 6 else str(ip)
    if NUMERIC_HOST.match(host):
        raise UnsafeUrl(
            f"the host {host} is not a valid IPv4 address: write four decimal numbers"
            " without leading zeros (e.g. 203.0.113.7)"
        )
    if not HOST_NAME.match(host) or len(host) > 253:
        raise UnsafeUrl(f"the host {host} is not a valid host name")
    return host


def _parsed(url: str, allow_loopback_http: bool) -> tuple[str, str, int]:
    try:
        # The parser of the client that will send: what it cannot read is refused now.
        parsed = httpx.URL(url)
        raw_host = parsed.raw_host.decode("ascii")
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as exc:
        raise UnsafeUrl(f"the URL cannot be parsed: {exc}") from None
    if not raw_host:
        raise UnsafeUrl("the URL has no host")
    if parsed.userinfo:
        raise UnsafeUrl("credentials in the URL are not allowed; use the signature")
    host = normalized_host(raw_host.lower())
    bare_host = host.strip("[]")
    scheme = parsed.scheme
    if scheme not in ("https", "http"):
        raise UnsafeUrl(_https_only(allow_loopback_http))
    if scheme == "http" and not (allow_loopback_http and _names_loopback(bare_host)):
        raise UnsafeUrl(_https_only(allow_loopback_http))
    normalized = str(parsed.copy_with(host=bare_host))
    return normalized, bare_host, port or (443 if scheme == "https" else 80)


def _https_only(allow_loopback_http: bool) -> str:
    return "the URL must use https" + (
        " (plain http only to loopback in dev mode)" if allow_loopback_http else ""
    )


def _names_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS
        )
    except (OSError, TimeoutError) as exc:
        raise UnsafeUrl(f"{host} does not resolve") from exc
    seen: list[IPAddress] = []
    for *_, sockaddr in infos:
        # Drop an IPv6 zone id ("fe80::1%eth0"): it is still link-local without it.
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in seen:
            seen.append(ip)
    if not seen:
        raise UnsafeUrl(f"{host} does not resolve")
    return seen


def checked(host: str, addresses: Iterable[IPAddress], allow_loopback: bool) -> list[IPAddress]:
    """All of `addresses`, or UnsafeUrl if any is refused (a mixed answer is refused whole)."""
    result = list(addresses)
    for ip in result:
        reason = address_refusal(ip, allow_loopback)
        if reason:
            raise UnsafeUrl(f"{host} resolves to {ip}, {reason}")
    return result


async def check_url(url: str, allow_loopback_http: bool) -> str:
    """Registration-time check: the normalised URL to store, or UnsafeUrl."""
    normalized, host, port = _parsed(url, allow_loopback_http)
    checked(host, await resolve(host, port), allow_loopback_http)
    return normalized


class CheckedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks, then connects to the checked address (never re-resolving)."""

    def __init__(self, allow_loopback: bool) -> None:
        self.allow_loopback = allow_loopback
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = checked(host, await resolve(host, port), self.allow_loopback)
        last_error: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeUrl("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class CheckedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow_loopback: bool, limits: httpx.Limits) -> None:
        # No proxies from the environment: a proxy would connect on our behalf, unchecked.
        super().__init__(trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedNetworkBackend(allow_loopback),
        )


def checked_client(
    allow_loopback: bool, timeout_seconds: float = 10.0, max_connections: int = 100
) -> httpx.AsyncClient:
    """The only client that calls customer URLs: checked addresses, no redirects, no proxy."""
    return httpx.AsyncClient(
        transport=CheckedTransport(
            allow_loopback,
            httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
        ),
        timeout=httpx.Timeout(timeout_seconds),
        follow_redirects=False,
        trust_env=False,
    )
