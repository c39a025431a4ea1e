"""A DNS server on loopback whose answers a test or a benchmark changes (dnslib for the wire
format), in front of simulated ComfyUI servers found through COMFYUI_DISCOVERY."""

from __future__ import annotations

import asyncio
from typing import cast

from dnslib import AAAA, PTR, QTYPE, RCODE, RR, A, DNSRecord

NAME = "comfyui.fleet.test."


class LoopbackDns(asyncio.DatagramProtocol):
    """A DNS server: `addresses` answer A/AAAA queries for NAME, `pods` PTR queries; a name it
    does not know is NXDOMAIN; `silent` drops every query, as a DNS server that is down."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.pods: dict[str, str] = {}
        self.silent = False
        self.queries = 0
        self.asked = asyncio.Condition()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asyncio.get_running_loop().create_task(self._counted())
        if self.silent or self.transport is None:
            return
        request = DNSRecord.parse(data)
        qname, qtype = str(request.q.qname), QTYPE[request.q.qtype]
        reply = request.reply()
        if qname == NAME and self.addresses:
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
        reversed_name = ".".join(reversed(address.split("."))) + ".in-addr.arpa."
        self.pods[reversed_name] = f"{pod}.comfyui.fleet.test."
