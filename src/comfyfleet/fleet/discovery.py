"""Backends found in DNS (DESIGN §7): `COMFYUI_DISCOVERY=dns:<name>:<port>`.

The name is resolved every DISCOVERY_INTERVAL seconds (A and AAAA records): a headless
Kubernetes Service answers one address per ready ComfyUI pod, a Compose service scaled to N
one per container. Each address is a backend, named after its pod (the first label of the
address's PTR name) when DNS has one, else after the address. A new address joins the fleet
and takes work once its websocket is up. One that vanished is drained: a prompt it had in
flight is requeued after the grace period, as a dead backend's is, and the backend leaves the
fleet once nothing runs there. One that comes back is enabled again.

Only backends this discovery added are ever drained or removed by it (the registry records
who added a backend); those of COMFYUI_ENDPOINTS and the API are left alone. A DNS failure
(timeout, SERVFAIL) changes nothing: only an answer, empty or not, says what exists.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from comfyfleet.comfy.endpoints import Backend, make_backend
from comfyfleet.fleet.fleet import Fleet
from comfyfleet.fleet.registry import BackendBusy, BackendRegistry, Registered
from comfyfleet.settings import Settings

log = logging.getLogger(__name__)

_SPEC = re.compile(r"dns:(?P<name>[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
RESOLVE_TIMEOUT = 5.0


class DnsUnavailable(Exception):
    """DNS gave no answer (timeout, SERVFAIL): nothing can be concluded from it."""


@dataclass(frozen=True)
class DnsTarget:
    """What COMFYUI_DISCOVERY names: a DNS name whose addresses are ComfyUI servers on `port`."""

    name: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> DnsTarget:
        found = _SPEC.fullmatch(spec.strip())
        if found is None or not 0 < int(found["port"]) < 65536:
            raise ValueError(f"COMFYUI_DISCOVERY={spec!r}: expected dns:<name>:<port>, "
                             "e.g. dns:comfyui-headless.default.svc.cluster.local:8188")
        return cls(found["name"], int(found["port"]))

    def __str__(self) -> str:
        return f"dns:{self.name}:{self.port}"

    def backend(self, address: str, name: str | None = None) -> Backend:
        """The backend at `address`, its URL normalised as every backend's is (port 80 left
        out, an IPv6 address in its short form), so a server listed in COMFYUI_ENDPOINTS or
        added through the API is recognised when DNS names it too."""
        host = f"[{address}]" if ":" in address else address
        return make_backend(f"http://{host}:{self.port}", name)

    def url(self, address: str) -> str:
        return self.backend(address).url


def make_resolver(nameserver: str | None, interval: float) -> dns.asyncresolver.Resolver:
    """The system's resolver (/etc/resolv.conf: the cluster's DNS in a pod), or `host:port`;
    a pass never outlasts the interval between passes."""
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        host, _, port = nameserver.rpartition(":")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host.strip("[]")]
        resolver.port = int(port)
    resolver.timeout = resolver.lifetime = min(RESOLVE_TIMEOUT, interval)
    return resolver


@dataclass
class DnsDiscovery:
    target: DnsTarget
    resolver: dns.asyncresolver.Resolver
    fleet: Fleet
    registry: BackendRegistry
    interval: float

    @classmethod
    def from_settings(cls, target: DnsTarget, settings: Settings, fleet: Fleet,
                      registry: BackendRegistry) -> DnsDiscovery:
        resolver = make_resolver(settings.discovery_nameserver, settings.discovery_interval)
        return cls(target, resolver, fleet, registry, settings.discovery_interval)

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except DnsUnavailable as exc:
                log.warning("discovery: %s did not resolve (%s); the fleet is unchanged",
                            self.target.name, exc)
            except Exception:  # the database may be away: the next pass tries again
                log.exception("discovery: a pass failed")
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        """One pass: resolve, add what is new, drain what vanished, remove what is drained
        and idle, enable what came back."""
        addresses = await self._addresses()
        await self.fleet.follow_registry()  # another process may have added some already
        registered = await self.registry.all()
        mine = {r.backend.url: r for r in registered if r.discovered_by == str(self.target)}
        taken_urls = {r.backend.url for r in registered}
        taken_names = {r.backend.name for r in registered}
        for address in addresses:
            url = self.target.url(address)
            entry = mine.get(url)
            if entry is not None:
                if entry.draining and entry.vanished:  # a drain of its own, not preStop's
                    log.info("discovery: %s is back; enabling %s", address, entry.backend.name)
                    await self.fleet.set_draining(entry.backend.name, False)
            elif url not in taken_urls:
                name = await self._name(address, taken_names)
                if name is None:
                    continue  # no answer on its name yet: a later pass adds it
                taken_names.add(name)
                log.info("discovery: %s appeared; adding backend %s", address, name)
                await self.fleet.add_backend(self.target.backend(address, name),
                                              discovered_by=str(self.target))
        for url, entry in mine.items():
            if url not in {self.target.url(a) for a in addresses}:
                await self._retire(entry)

    async def _retire(self, entry: Registered) -> None:
        name = entry.backend.name
        if self.fleet.session(name) is None:
            return
        if not entry.vanished:  # drained here, or marked: only its return undoes this
            log.info("discovery: %s vanished from DNS; draining it", name)
            await self.fleet.set_draining(name, True, vanished=True)
        try:
            await self.fleet.remove_backend(name)
            log.info("discovery: %s removed", name)
        except BackendBusy:
            pass  # prompts still in flight there: a later pass removes it

    async def _addresses(self) -> list[str]:
        found: list[str] = []
        for record in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(self.target.name, record, search=True)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue  # no such name, or none of this family: no backends there
            except dns.exception.DNSException as exc:
                raise DnsUnavailable(str(exc) or type(exc).__name__) from exc
            found.extend(rdata.address for rdata in answer)
        return sorted(set(found))

    async def _name(self, address: str, taken: set[str]) -> str | None:
        """The pod's name when the address has a PTR record (`comfyui-0.comfyui.ns.svc...`),
        else the address; never a name the fleet already has. None when DNS gave no answer
        (timeout, SERVFAIL): a backend keeps its name, so a slow reply must not name a pod
        after its address for good."""
        fallback = re.sub(r"[^0-9a-z]+", "-", str(ipaddress.ip_address(address)).lower())
        try:
            answer = await self.resolver.resolve_address(address)
            label = str(answer[0].target).split(".")[0].lower()
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return fallback
        except dns.exception.DNSException as exc:
            log.warning("discovery: no name for %s yet (%s); adding it on a later pass",
                        address, str(exc) or type(exc).__name__)
            return None
        return label if _LABEL.fullmatch(label) and label not in taken else fallback
