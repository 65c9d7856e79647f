# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cutting console connections on the hypervisor host: the kernel destroys the TCP socket
(``ss -K``, ``SOCK_DESTROY``), the client gets a reset at once and QEMU sees its client go
(libvirt then emits the graphics ``disconnect``).

Which connections: established TCP connections whose peer (an ``ipaddress`` value; an IPv4
client of a dual-stack listener shows as ``::ffff:a.b.c.d`` and is its IPv4 address; an
IPv4-compatible ``::a.b.c.d`` client is that IPv6 address) lies in one of the given networks,
and whose local port is a console port: a port a QEMU process listens on (found with
``console_ports``), or one of the configured ports on which something listens (so never this
host's own outgoing connections), optionally only the one from a given client port.

That includes connections still in QEMU's accept queue: the kernel completed their handshake
but QEMU (whose VNC listener has a backlog of 1) has not accepted them yet. They are
established sockets on the listening port, without an owner, and ``ss -K`` destroys them too.

One listing per attempt for the whole batch (not one per address); the ``ss -K`` commands name
each connection exactly (local and peer address and port), at most ``chunk_size`` per command so
the argument list stays small for hundreds of connections. ``ss -K`` exits 0 whether or not it
destroyed anything, so the result is checked by listing again: the connections must be gone
(retried, then an error naming those that remain).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from ansible_collections.virtguard.console.plugins.module_utils.console_ports import (
    DEFAULT_CONSOLE_PROCESSES,
    PortDiscoveryError,
    console_ports_of,
    read_listeners,
    split_endpoint,
)
from ansible_collections.virtguard.console.plugins.module_utils.host_commands import Run
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    AddressError,
    IPNetwork,
    format_port_ranges,
    normalize_address,
    parse_network,
    parse_port_ranges,
    port_in_ranges,
)

SS_ESTABLISHED: list[str] = ["ss", "-t", "-n", "-H", "state", "established"]
DEFAULT_CHUNK_SIZE = 100


class CutError(Exception):
    """The connections could not be listed or are still there after the cut."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}


class Connection(NamedTuple):
    """An established TCP connection as ss prints it (addresses without brackets)."""

    local_address: str
    local_port: int
    peer_address: str
    peer_port: int


def parse_established(output: str) -> list[Connection]:
    """The lines of ``ss -t -n -H state established``: Recv-Q Send-Q Local Peer (the state
    filter leaves the State column out)."""
    connections = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, local_port = split_endpoint(fields[2])
        peer, peer_port = split_endpoint(fields[3])
        if local_port is None or peer_port is None:
            continue
        connections.append(Connection(local, local_port, peer, peer_port))
    return connections


def parse_client_networks(addresses: Iterable[Any]) -> list[IPNetwork]:
    """Client addresses and networks as network values (IPv4-mapped as IPv4), checked."""
    networks: list[IPNetwork] = []
    for text in addresses:
        try:
            network = parse_network(text)
        except AddressError as exc:
            raise CutError(f"addresses: {exc}") from None
        if network not in networks:
            networks.append(network)
    return networks


def peer_in(connection: Connection, networks: Sequence[IPNetwork]) -> bool:
    """Whether the connection's peer, as an address value, is in one of ``networks``."""
    peer = normalize_address(connection.peer_address)
    return peer is not None and any(peer.version == n.version and peer in n for n in networks)


def _ss_endpoint(address: str, port: int) -> str:
    """An endpoint for an ss filter: the address as ss printed it (so the socket family
    matches), without a scope, which ss's filter parser does not take."""
    address = address.split("%", 1)[0]
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def kill_command(connections: Sequence[Connection]) -> list[str]:
    """One ``ss -K`` naming each connection exactly."""
    expression: list[str] = []
    for conn in connections:
        if expression:
            expression.append("or")
        expression += ["(", "src", _ss_endpoint(conn.local_address, conn.local_port),
                       "and", "dst", _ss_endpoint(conn.peer_address, conn.peer_port), ")"]
    return ["ss", "-t", "-n", "-H", "-K", "state", "established", "("] + expression + [")"]


def _check_client_port(client_port: object) -> int | None:
    """``client_port`` (None or a port number) as given; anything else is a CutError."""
    if client_port is not None and not (isinstance(client_port, int) and 1 <= client_port <= 65535):
        raise CutError(f"client_port must be a port number from 1 to 65535, got {client_port!r}")
    return client_port


class ConnectionCutter:
    """Lists and destroys console connections, through ``run(argv, data=None) -> (rc, out, err)``."""

    def __init__(self, run: Run, sleep: Callable[[float], None] = time.sleep,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.run = run
        self.sleep = sleep
        self.chunk_size = max(1, int(chunk_size))

    def _ss(self, argv: list[str]) -> str:
        rc, out, err = self.run(argv)
        if rc != 0:
            raise CutError(f"{' '.join(argv[:7])} failed (rc {rc}): {err.strip()}")
        return out

    def console_ports(self, ports: Iterable[Any] = (), discover_ports: bool = True,
                      console_processes: Sequence[str] = DEFAULT_CONSOLE_PROCESSES,
                      ) -> tuple[set[int], list[tuple[int, int]]]:
        """The console ports: those a console process listens on (when ``discover_ports``) and
        the ``ports`` ranges, these only where something listens. Returns (listening console
        ports, configured ranges)."""
        try:
            ranges = parse_port_ranges(ports)
        except AddressError as exc:
            raise CutError(str(exc)) from None
        try:
            listeners = read_listeners(self.run)
        except PortDiscoveryError as exc:
            raise CutError(str(exc)) from None
        found = console_ports_of(listeners, console_processes) if discover_ports else set()
        found |= {listener.port for listener in listeners if port_in_ranges(listener.port, ranges)}
        return found, ranges

    def matching(self, networks: Sequence[IPNetwork], console_ports: set[int],
                 client_port: int | None = None) -> list[Connection]:
        """The established connections from ``networks`` to ``console_ports`` (one listing)."""
        return [conn for conn in parse_established(self._ss(list(SS_ESTABLISHED)))
                if conn.local_port in console_ports and peer_in(conn, networks)
                and (client_port is None or conn.peer_port == client_port)]

    def _destroy(self, connections: Sequence[Connection]) -> None:
        for start in range(0, len(connections), self.chunk_size):
            self._ss(kill_command(connections[start:start + self.chunk_size]))

    def cut(self, addresses: Iterable[Any], ports: Iterable[Any] = (), client_port: int | None = None,
            discover_ports: bool = True, console_processes: Sequence[str] = DEFAULT_CONSOLE_PROCESSES,
            check_mode: bool = False, verify_attempts: int = 3) -> dict[str, Any]:
        """Destroy the console connections from ``addresses`` and check they are gone."""
        networks = parse_client_networks(addresses)
        client_port = _check_client_port(client_port)
        console_ports, _ranges = self.console_ports(ports, discover_ports, console_processes)
        found = self.matching(networks, console_ports, client_port) if networks and console_ports else []
        result: dict[str, Any] = {
            "changed": bool(found),
            "addresses": [str(n.network_address) if n.num_addresses == 1 else str(n) for n in networks],
            "client_port": client_port,
            "ports": format_port_ranges(parse_port_ranges(sorted(console_ports))),
            "cut": [conn._asdict() for conn in found],
            "remaining": [],
            "verified": False,
        }
        if check_mode or not found:
            result["verified"] = not check_mode
            return result
        # Every attempt destroys whatever matches now: also a connection that came in since the
        # listing (an address whose block failed can reconnect).
        cut = list(found)
        remaining = list(found)
        for attempt in range(max(1, verify_attempts)):
            self._destroy(remaining)
            remaining = self.matching(networks, console_ports, client_port)
            cut += [conn for conn in remaining if conn not in cut]
            if not remaining:
                result.update(verified=True, cut=[conn._asdict() for conn in cut])
                return result
            self.sleep(0.05 * (attempt + 1))
        result["remaining"] = [conn._asdict() for conn in remaining]
        result["cut"] = [conn._asdict() for conn in cut if conn not in remaining]
        raise CutError(f"{len(remaining)} connection(s) still established after {verify_attempts} attempts: "
                       + ", ".join(f"{c.peer_address}:{c.peer_port} -> {c.local_port}" for c in remaining[:20]),
                       result)
