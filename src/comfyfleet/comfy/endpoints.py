"""Backend endpoints: `host:port` or `http(s)://host:port[/path]`, named.

The same rules hold for COMFYUI_ENDPOINTS (`...#name`) and for backends added through the API:
a name is a slug that a URL path can carry (`PATCH /backends/{name}`), and a URL says only where
ComfyUI is. Credentials, a query or a fragment in it are refused rather than dropped or kept:
comfyfleet would not send them, and would show them in `GET /backends` and its logs.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# Letters, digits and `. _ - :` (host:port, the default name), `[ ]` for IPv6 literals.
NAME_PATTERN = r"^[A-Za-z0-9\[][A-Za-z0-9._:\[\]-]{0,99}$"
_NAME = re.compile(NAME_PATTERN)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Whitespace and control characters: urlsplit would drop some of them silently.
_UNPRINTABLE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class Backend:
    name: str
    url: str


class InvalidBackend(ValueError):
    """A backend's URL or name breaks the rules; `field` says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_endpoint(text: str) -> Backend:
    """`gpu1.lan:8188#big` -> Backend("big", "http://gpu1.lan:8188") (COMFYUI_ENDPOINTS)."""
    address, _, name = text.strip().partition("#")
    return make_backend(address, name.strip() or None)


def make_backend(address: str, name: str | None = None) -> Backend:
    """The backend at `address`, named `name` or, by default, host:port. The URL is
    normalised (scheme and host in lower case, an IPv6 address in its short form, no default
    port, no trailing slash), so one server has one URL."""
    shown = _redacted(address)
    if _UNPRINTABLE.search(address.strip()):
        raise InvalidBackend("url", f"backend URL {shown!r} contains whitespace or control "
                                    "characters")
    if "://" not in address:
        address = "http://" + address.strip()
    try:
        parts = urlsplit(address.strip())
    except ValueError as exc:  # an unclosed IPv6 bracket
        raise InvalidBackend("url", f"bad host or port in backend URL {shown!r}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidBackend("url", f"not a ComfyUI endpoint: {shown!r} (expected host:port or "
                                    "http(s)://host:port)")
    if "@" in parts.netloc:
        raise InvalidBackend("url", f"backend URL {shown!r} has credentials (user:password@): "
                                    "they are not supported; reach ComfyUI without them")
    if "?" in address or "#" in address:
        raise InvalidBackend("url", f"backend URL {shown!r} has a query or a fragment: give "
                                    "only scheme, host, port and path (and the name apart)")
    try:
        port = parts.port
        parts.hostname.encode("idna")
    except (ValueError, UnicodeError) as exc:
        raise InvalidBackend("url", f"bad host or port in backend URL {shown!r}") from exc
    if port == 0:
        raise InvalidBackend("url", f"bad port in backend URL {shown!r}")
    if port == _DEFAULT_PORTS[parts.scheme]:
        port = None
    host = f"[{_short_ipv6(parts.hostname)}]" if ":" in parts.hostname else parts.hostname
    netloc = host if port is None else f"{host}:{port}"
    url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
    name = netloc if name is None else name
    if not _NAME.match(name):
        raise InvalidBackend("name", f"backend name {name!r} is not a slug: 1 to 100 letters, "
                                     "digits and . _ - : [ ], starting with a letter or digit")
    return Backend(name=name, url=url)


def parse_endpoints(items: list[str]) -> list[Backend]:
    """COMFYUI_ENDPOINTS: every entry valid, no name and no URL twice."""
    backends = [parse_endpoint(item) for item in items]
    for attribute, hint in (("name", "name them with #name"), ("url", "list each server once")):
        values = [getattr(backend, attribute) for backend in backends]
        twice = sorted({value for value in values if values.count(value) > 1})
        if twice:
            raise InvalidBackend(attribute, f"duplicate backend {attribute}s: "
                                            f"{', '.join(twice)} ({hint})")
    return backends


def _short_ipv6(literal: str) -> str:
    """`fd00:0:0::7` -> `fd00::7`, as DNS discovery and `GET /backends` show it."""
    try:
        return ipaddress.IPv6Address(literal).compressed
    except ValueError:  # an IPvFuture literal: kept as written
        return literal


def _redacted(address: str) -> str:
    """`address` without the password it may hold, fit for error messages and logs."""
    scheme, sep, rest = address.strip().partition("://")
    if not sep:
        scheme, rest = "", scheme
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{path}"
