"""A DNS server on loopback whose answers a test or a benchmark changes (dnslib for the wire
format), in front of simulated ComfyUI servers found through COMFYUI_DISCOVERY.

It runs in the caller's event loop, so a change to `addresses` is what the next query sees,
at a moment the caller knows. dnslib is a development requirement only: tests and bench/ use
this server, the package never does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from dnslib import AAAA, PTR, QTYPE, RCODE, RR, A, DNSRecord

from tests.support import LOOPBACK

NAME = "comfyui.fleet.test."


class LoopbackDns(asyncio.DatagramProtocol):
    """A DNS server: `addresses` answer A/AAAA queries for `name`, `pods` PTR queries; a name
    it does not know is NXDOMAIN; `silent` drops every query, as a DNS server that is down,
    `silent_ptr` only PTR queries, as one too slow on reverse lookups."""

    def __init__(self, name: str = NAME) -> None:
        self.name = name if name.endswith(".") else name + "."
        self.addresses: list[str] = []
        self.pods: dict[str, str] = {}
        self.silent = False
        self.silent_ptr = False
        self.queries = 0
        self.asked = asyncio.Condition()
        self.transport: asyncio.DatagramTransport | None = None

    @property
    def nameserver(self) -> str:
        """Where it listens, as DISCOVERY_NAMESERVER takes it: `host:port`."""
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asyncio.get_running_loop().create_task(self._counted())
        if self.silent or self.transport is None:
            return
        request = DNSRecord.parse(data)
        qname, qtype = str(request.q.qname), QTYPE[request.q.qtype]
        if qtype == "PTR" and self.silent_ptr:
            return
        reply = request.reply()
        if qname == self.name and self.addresses:
            for address in self.addresses:
                if qtype == "A" and ":" not in address:
                    reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=0))
                if qtype == "AAAA" and ":" in address:
                    reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(address), ttl=0))
        elif qtype == "PTR" and qname in self.pods:
            reply.add_answer(RR(qname, QTYPE.PTR, rdata=PTR(self.pods[qname]), ttl=0))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        self.transport.sendto(reply.pack(), addr)

    async def _counted(self) -> None:
        async with self.asked:
            self.queries += 1
            self.asked.notify_all()

    async def passes(self, count: int) -> None:
        """Until `count` more discovery passes asked (each asks A and AAAA at least)."""
        async with self.asked:
            target = self.queries + 2 * count
            await asyncio.wait_for(self.asked.wait_for(lambda: self.queries >= target), 30)

    def name_pod(self, address: str, pod: str) -> None:
        """A PTR record for an IPv4 `address`: the pod `pod` of the headless service."""
        reversed_name = ".".join(reversed(address.split("."))) + ".in-addr.arpa."
        self.pods[reversed_name] = f"{pod}.{self.name}"


@asynccontextmanager
async def loopback_dns(name: str = NAME) -> AsyncIterator[LoopbackDns]:
    """A LoopbackDns for `name` listening on a free UDP port of loopback, until the block ends."""
    transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: LoopbackDns(name), local_addr=(LOOPBACK, 0))
    try:
        yield server
    finally:
        transport.close()
