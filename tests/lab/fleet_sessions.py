"""Console clients of fleet hosts (lab.fleet): client namespaces (lab.netns) routed to the fleet,
and VNC sessions from them, judged where they live: the host's kernel (``ss`` in the host's
network namespace) and QEMU's own client list (``query-vnc`` on the host)."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

from lab import rfb
from lab.fleet import FleetHost, route_clients_to_fleet
from lab.hypervisor import Domain
from lab.netns import ClientNamespace
from lab.server_view import established_peers, vnc_clients


class FleetClients:
    """``make()`` creates a client namespace that reaches every fleet host of this process, on
    the lab.netns index given or the first of ``indexes`` not in use; ``delete()`` removes all
    it made."""

    def __init__(self, indexes: range, tag: str) -> None:
        self.indexes = indexes
        self.tag = tag
        self.made: list[ClientNamespace] = []
        self.used: set[int] = set()

    def make(self, index: int | None = None) -> ClientNamespace:
        if index is None:
            index = next(i for i in self.indexes if i not in self.used)
        ns = ClientNamespace(index, tag=self.tag)
        self.used.add(index)
        self.made.append(ns)
        ns.create()
        route_clients_to_fleet(ns)
        return ns

    def delete(self) -> None:
        for ns in self.made:
            ns.delete()
        self.made = []
        self.used = set()


@dataclass
class ConsoleSession:
    """A VNC session from the client namespace ``ns`` to ``domain`` on ``host``."""

    ns: ClientNamespace
    host: FleetHost
    domain: Domain
    sock: socket.socket
    port: int  # the client's

    @property
    def peer(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        """(client address, client port), as the host sees it."""
        return ipaddress.ip_address(self.ns.client_ip), self.port

    @property
    def remote(self) -> dict[str, str]:
        """The source's ``remote`` for this session."""
        return {"family": "ipv4", "node": self.ns.client_ip, "service": str(self.port)}

    def held(self) -> bool:
        """Whether the host holds the session: its kernel has the connection established and
        QEMU lists the client."""
        if self.peer not in established_peers([self.domain.vnc_port], netns=self.host.name):
            return False
        return self.peer in vnc_clients(self.host.query_vnc(self.domain.name))

    def gone(self) -> bool:
        """Whether neither the host's kernel nor QEMU has the session any more."""
        if self.peer in established_peers([self.domain.vnc_port], netns=self.host.name):
            return False
        return self.peer not in vnc_clients(self.host.query_vnc(self.domain.name))

    def close(self, timeout: float = 30) -> None:
        """Close the client's socket and wait until the host has let go of the session."""
        self.sock.close()
        deadline = time.monotonic() + timeout
        while not self.gone():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.host.hostname} still holds the closed session {self.peer}")
            time.sleep(0.2)


def open_console_session(ns: ClientNamespace, host: FleetHost, domain: Domain, check: bool = True) -> ConsoleSession:
    """A session (RFB handshake done) from ``ns`` to ``domain`` on ``host``; with ``check``, the
    host holds it once this returns."""
    sock = ns.call(rfb.open_session, host.address, domain.vnc_port)
    session = ConsoleSession(ns, host, domain, sock, sock.getsockname()[1])
    if check and not session.held():
        sock.close()
        raise AssertionError(f"{host.hostname} does not hold the session of {ns.client_ip} just opened")
    return session
