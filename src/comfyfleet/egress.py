"""The SSRF guard (DESIGN §5, §8): comfyfleet connects on a client's behalf only to public
addresses, so a callback or input URL cannot reach the gateway's own network.

Two checks, for two moments:
- `check_url` at submit, so a bad URL is refused with a clear answer (422);
- `guarded_connector` (aiohttp's) and `public_addresses` (the lean client's resolver) at
  connect time, because DNS can answer differently later (rebinding): non-public answers are
  dropped and any other address refused (an IP-literal URL's address too), so the connection
  itself only goes to an allowed address. Redirects must not be followed with them (each hop
  would need the same checks).
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

RESOLVE_TIMEOUT = 5.0
# A DNS name: at most 253 characters, in labels of 1 to 63 letters, digits, '-' or '_'.
_MAX_NAME = 253
_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")
_NAT64 = ip_network("64:ff9b::/96")


class UrlNotAllowed(ValueError):
    """The URL may not be fetched or called; the message says why."""


def _embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, where packets end up (mapped, 6to4, NAT64)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_allowed(address: str | IPv4Address | IPv6Address) -> bool:
    """Whether `address` is a public unicast address (not loopback, private, link-local and
    so cloud metadata, CGNAT, multicast, reserved or unspecified)."""
    ip = ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(ip, IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
        ip = embedded
    # is_global alone lets multicast through, and its ranges differ between Python versions.
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
    )


# A client sends its callback URL with every job: the same few URLs, parsed once each.
@lru_cache(maxsize=256)
def _host_and_port(url: str) -> tuple[str, int | None]:
    """The host and port of an http(s) URL that can be connected to as written; UrlNotAllowed
    for anything else (no scheme or host, a port out of range, a broken IPv6 literal, a name
    DNS cannot carry), before any name is looked up."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlNotAllowed(f"{url!r} is not a valid URL: {exc}") from exc
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise UrlNotAllowed(f"{url!r} is not an http(s) URL with a host")
    try:
        ip_address(host.split("%", 1)[0])
        return host, port
    except ValueError:
        pass  # a name, not an address
    try:
        encoded = host.encode("idna")  # as the resolver will send it
    except UnicodeError:
        encoded = b""
    name = encoded.removesuffix(b".")  # the root's dot
    if len(name) > _MAX_NAME or not all(_LABEL.fullmatch(label) for label in name.split(b".")):
        raise UrlNotAllowed(f"{host!r} is not a valid host name")
    return host, port


async def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse (UrlNotAllowed) a URL that is not a valid http(s) URL or whose host resolves to
    any address that is not public. With `allow_private`, the URL is only parsed."""
    host, port = _host_and_port(url)
    if allow_private:
        return
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port or 0, type=socket.SOCK_STREAM
            )
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise UrlNotAllowed(f"host {host!r} does not resolve: {exc}") from exc
    # Any private answer refuses the URL: which one is used later is not ours to choose.
    refused = sorted({str(info[4][0]) for info in infos if not address_allowed(str(info[4][0]))})
    if refused:
        raise UrlNotAllowed(
            f"host {host!r} resolves to a non-public address ({', '.join(refused)})"
        )


def _refused(reason: str) -> OSError:
    # With an errno, aiohttp's connection errors show `reason` (as the OS error's text).
    return OSError(errno.EACCES, reason)


class PublicResolver(AbstractResolver):
    """The default resolver, keeping only public answers."""

    def __init__(self) -> None:
        self._inner: AbstractResolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        allowed = [answer for answer in answers if address_allowed(answer["host"])]
        if not allowed:
            raise _refused(f"{host} resolves only to non-public addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


async def public_addresses(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
    """The public addresses of `host` (an address itself, or a name), as the lean HTTP
    client's `resolve` takes them; OSError when it has none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    allowed: list[tuple[int, tuple[Any, ...]]] = [
        (family, address) for family, _, _, _, address in infos
        if address_allowed(str(address[0]))]
    if not allowed:
        raise _refused(f"{host} resolves only to non-public addresses")
    return allowed


def _public_socket(addr_info: AddrInfoType) -> socket.socket:
    family, type_, proto, _, address = addr_info
    if not address_allowed(str(address[0])):
        raise _refused(f"connection to non-public address {address[0]} refused")
    return socket.socket(family=family, type=type_, proto=proto)


def guarded_connector(*, allow_private: bool, limit: int = 100) -> aiohttp.TCPConnector:
    """A connector that only connects to public addresses (anything, with `allow_private`)."""
    if allow_private:
        return aiohttp.TCPConnector(limit=limit)
    return aiohttp.TCPConnector(
        limit=limit, resolver=PublicResolver(), socket_factory=_public_socket
    )
