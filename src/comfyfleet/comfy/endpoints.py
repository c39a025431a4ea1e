"""Backend endpoints as configured: `host:port`, `http(s)://host:port`, optional `#name`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Backend:
    name: str
    url: str


def parse_endpoint(text: str) -> Backend:
    """`gpu1.lan:8188#big` -> Backend("big", "http://gpu1.lan:8188").

    The name defaults to host:port.
    """
    address, _, name = text.strip().partition("#")
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a ComfyUI endpoint: {text!r} (expected host:port or http(s)://host:port)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in ComfyUI endpoint {text!r}") from exc
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:  # IPv6 literal
        netloc = f"[{parts.hostname}]" + ("" if port is None else f":{port}")
    url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
    return Backend(name=name.strip() or netloc, url=url)


def parse_endpoints(items: list[str]) -> list[Backend]:
    backends = [parse_endpoint(item) for item in items]
    names = [backend.name for backend in backends]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate backend names: {', '.join(duplicates)} (name them with #name)")
    return backends
