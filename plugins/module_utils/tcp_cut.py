# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cutting console connections on the hypervisor host: the kernel destroys the TCP socket
(``ss -K``, ``SOCK_DESTROY``), the client gets a reset at once and QEMU sees its client go
(libvirt then emits the graphics ``disconnect``).

Which connections: established TCP connections whose peer (an ``ipaddress`` value; an IPv4
client of a dual-stack listener shows as ``::ffff:a.b.c.d`` and is its IPv4 address; an
IPv4-compatible ``::a.b.c.d`` client is that IPv6 address) lies in one of the given networks
(optionally only the one from a given client port), or which a ``session`` names exactly (peer
address and port, and the console port when given: a client that must be cut but never
blocked, and never widened to its address's other connections); and whose local port is a
console port: a port a QEMU process listens on (found with ``console_ports``), or one of the
configured ports on which something listens (so never this host's own outgoing connections).

That includes connections still in QEMU's accept queue: the kernel completed their handshake
but QEMU (whose VNC listener has a backlog of 1) has not accepted them yet. They are
established sockets on the listening port, without an owner, and ``ss -K`` destroys them too.

One listing per attempt for the whole batch (not one per address); the ``ss -K`` commands name
each connection exactly (local and peer address and port, and the interface of a socket bound to
one, such as a link-local connection: ss_endpoints), at most ``chunk_size`` per command so the
argument list stays small for hundreds of connections.

One connection never keeps another from being cut: ss refuses a whole command when it cannot
read one of its conditions, so a command that fails is tried again one connection at a time,
and whatever cannot be cut is reported (``failed``, each with its reason) after everything else
was. ``ss -K`` exits 0 whether or not it destroyed anything, so the result is checked by listing
again: the connections must be gone (retried, then an error naming those that remain).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from ansible_collections.virtguard.console.plugins.module_utils.console_ports import (
    DEFAULT_CONSOLE_PROCESSES,
    PortDiscoveryError,
    console_ports_of,
    read_listeners,
)
from ansible_collections.virtguard.console.plugins.module_utils.host_commands import Run
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    AddressError,
    IPAddress,
    IPNetwork,
    format_port_ranges,
    normalize_address,
    parse_network,
    parse_port_ranges,
    port_in_ranges,
)
from ansible_collections.virtguard.console.plugins.module_utils.ss_endpoints import filter_address, parse_endpoint

SS_ESTABLISHED: list[str] = ["ss", "-t", "-n", "-H", "state", "established"]
DEFAULT_CHUNK_SIZE = 100
SESSION_KEYS = ("address", "client_port", "console_port")


class CutError(Exception):
    """The input is wrong, the connections could not be listed, or some could not be cut
    (``result`` then says which, and what became of the others)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}


class Connection(NamedTuple):
    """An established TCP connection as ss prints it: addresses without brackets or zone, and
    the interface its socket is bound to (the zone of a link-local connection), or None."""

    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    interface: str | None = None

    def report(self) -> dict[str, Any]:
        """The connection as results and the audit show it (the interface only tells ss which
        socket it is)."""
        return {"local_address": self.local_address, "local_port": self.local_port,
                "peer_address": self.peer_address, "peer_port": self.peer_port}

    def __str__(self) -> str:
        peer = f"[{self.peer_address}]" if ":" in self.peer_address else self.peer_address
        via = f" on {self.interface}" if self.interface else ""
        return f"{peer}:{self.peer_port} -> {self.local_port}{via}"


def parse_established(output: str) -> list[Connection]:
    """The lines of ``ss -t -n -H state established``: Recv-Q Send-Q Local Peer (the state
    filter leaves the State column out)."""
    connections = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, peer = parse_endpoint(fields[2]), parse_endpoint(fields[3])
        if local.port is None or peer.port is None:
            continue
        connections.append(Connection(local.address, local.port, peer.address, peer.port,
                                      local.interface or peer.interface))
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


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


class ExactSession(NamedTuple):
    """One client connection named exactly: the client's address (a value, IPv4-mapped as
    IPv4) and port, and the console port it reached (None: any console port)."""

    address: IPAddress
    client_port: int
    console_port: int | None

    def names(self, connection: Connection) -> bool:
        """Whether ``connection`` is this session (its console port is checked elsewhere)."""
        return (connection.peer_port == self.client_port
                and (self.console_port is None or connection.local_port == self.console_port)
                and normalize_address(connection.peer_address) == self.address)

    def report(self) -> dict[str, Any]:
        return {"address": str(self.address), "client_port": self.client_port, "console_port": self.console_port}


def parse_sessions(items: Iterable[Any]) -> list[ExactSession]:
    """``sessions`` (mappings of ``address``, ``client_port`` and optionally ``console_port``)
    as ExactSession values, checked; a CutError names the bad item by its index."""
    sessions: list[ExactSession] = []
    for index, item in enumerate(items):
        where = f"sessions[{index}]"
        if not isinstance(item, Mapping):
            raise CutError(f"{where}: {item!r} is not a mapping of address, client_port and console_port")
        unknown = sorted(str(key) for key in item if key not in SESSION_KEYS)
        if unknown:
            raise CutError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SESSION_KEYS)}")
        address = normalize_address(item.get("address"))
        if address is None:
            # a session is one connection: a network would widen it to other clients
            raise CutError(f"{where}: address {item.get('address')!r} is not an IP address")
        if not _is_port(item.get("client_port")):
            raise CutError(f"{where}: client_port must be a port number from 1 to 65535, "
                           f"got {item.get('client_port')!r}")
        console_port = item.get("console_port")
        if console_port is not None and not _is_port(console_port):
            raise CutError(f"{where}: console_port must be a port number from 1 to 65535, got {console_port!r}")
        session = ExactSession(address, item["client_port"], console_port)
        if session not in sessions:
            sessions.append(session)
    return sessions


class Selection(NamedTuple):
    """Which console connections a cut destroys: those from ``networks`` (only from
    ``client_port``, when given) and those ``sessions`` name."""

    networks: Sequence[IPNetwork]
    client_port: int | None
    sessions: Sequence[ExactSession]

    def selects(self, connection: Connection) -> bool:
        if (self.networks and peer_in(connection, self.networks)
                and (self.client_port is None or connection.peer_port == self.client_port)):
            return True
        return any(session.names(connection) for session in self.sessions)

    def __bool__(self) -> bool:
        return bool(self.networks or self.sessions)


def connection_filter(connection: Connection, interfaces: Mapping[str, int]) -> list[str]:
    """The ss filter words that name one connection: local and peer address and port, and the
    interface its socket is bound to as a condition of its own, by index (``dev = 3``).

    ss refuses a zone in an address and matches a link-local address without one; the index
    (``interfaces``: name -> index) keeps the interface as data: ss's filter lexer reads an
    interface named like one of its words (``or``, ``dst``, ``=``) as that word and refuses the
    command, and drops backslashes. An interface not in ``interfaces`` (gone since the listing)
    is left out: the addresses and ports still name the socket."""
    words = ["src", filter_address(connection.local_address, connection.local_port),
             "and", "dst", filter_address(connection.peer_address, connection.peer_port)]
    if connection.interface is not None and connection.interface in interfaces:
        words += ["and", "dev", "=", str(interfaces[connection.interface])]
    return words


def kill_command(connections: Sequence[Connection], interfaces: Mapping[str, int] | None = None) -> list[str]:
    """One ``ss -K`` naming each connection exactly (``interfaces``: see connection_filter)."""
    expression: list[str] = []
    for conn in connections:
        if expression:
            expression.append("or")
        expression += ["(", *connection_filter(conn, interfaces or {}), ")"]
    return ["ss", "-t", "-n", "-H", "-K", "state", "established", "("] + expression + [")"]


def interface_index(name: str) -> int | None:
    """This host's index of the interface ``name``, or None when there is none by that name."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _ss_failure(rc: int, err: str) -> str:
    """ss's complaint on one line (it prints the bad word, then what it could not parse)."""
    return f"ss -K failed (rc {rc}): {' '.join(err.split())[:500] or 'no message'}"


def _check_client_port(client_port: object) -> int | None:
    """``client_port`` (None or a port number) as given; anything else is a CutError."""
    if client_port is None or (isinstance(client_port, int) and _is_port(client_port)):
        return client_port
    raise CutError(f"client_port must be a port number from 1 to 65535, got {client_port!r}")


class ConnectionCutter:
    """Lists and destroys console connections, through ``run(argv, data=None) -> (rc, out, err)``."""

    def __init__(self, run: Run, sleep: Callable[[float], None] = time.sleep,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 index_of: Callable[[str], int | None] = interface_index):
        self.run = run
        self.sleep = sleep
        self.chunk_size = max(1, int(chunk_size))
        self.index_of = index_of

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

    def matching(self, selection: Selection, console_ports: set[int]) -> list[Connection]:
        """The established connections to ``console_ports`` that ``selection`` selects (one listing)."""
        return [conn for conn in parse_established(self._ss(list(SS_ESTABLISHED)))
                if conn.local_port in console_ports and selection.selects(conn)]

    def _destroy(self, connections: Sequence[Connection]) -> dict[Connection, str]:
        """``ss -K`` for ``connections``, ``chunk_size`` per command. ss refuses a whole command
        for one condition it cannot read, so a command that fails is run again one connection
        at a time: one connection never keeps the others of its chunk from being cut. Returns
        the connections whose own command failed, with ss's error."""
        failures: dict[Connection, str] = {}
        interfaces: dict[str, int] = {}
        for name in {conn.interface for conn in connections if conn.interface}:
            index = self.index_of(name)
            if index is not None:
                interfaces[name] = index
        for start in range(0, len(connections), self.chunk_size):
            chunk = connections[start:start + self.chunk_size]
            rc, _out, err = self.run(kill_command(chunk, interfaces))
            if rc == 0:
                continue
            if len(chunk) == 1:
                failures[chunk[0]] = _ss_failure(rc, err)
                continue
            for conn in chunk:
                rc, _out, err = self.run(kill_command([conn], interfaces))
                if rc != 0:
                    failures[conn] = _ss_failure(rc, err)
        return failures

    def cut(self, addresses: Iterable[Any] = (), ports: Iterable[Any] = (), client_port: int | None = None,
            discover_ports: bool = True, console_processes: Sequence[str] = DEFAULT_CONSOLE_PROCESSES,
            check_mode: bool = False, verify_attempts: int = 3, sessions: Iterable[Any] = ()) -> dict[str, Any]:
        """Destroy the console connections from ``addresses`` and those ``sessions`` name, and
        check they are gone. Raises CutError (with the result) when some could not be cut,
        after the others were."""
        selection = Selection(parse_client_networks(addresses), _check_client_port(client_port),
                              parse_sessions(sessions))
        console_ports, _ranges = self.console_ports(ports, discover_ports, console_processes)
        found = self.matching(selection, console_ports) if selection and console_ports else []
        result: dict[str, Any] = {
            "changed": bool(found),
            "addresses": [str(n.network_address) if n.num_addresses == 1 else str(n) for n in selection.networks],
            "client_port": selection.client_port,
            "sessions": [session.report() for session in selection.sessions],
            "ports": format_port_ranges(parse_port_ranges(sorted(console_ports))),
            "cut": [conn.report() for conn in found],
            "remaining": [],
            "failed": [],
            "verified": False,
        }
        if check_mode or not found:
            result["verified"] = not check_mode
            return result
        attempts = max(1, verify_attempts)
        seen = list(found)
        remaining = list(found)
        # why each connection still there is: its last ss -K error, or none (ss ran, the socket stayed)
        reasons: dict[Connection, str] = {}
        for attempt in range(attempts):
            # every attempt destroys whatever matches now: also a connection that came in since
            # the listing (an address whose block failed can reconnect)
            failures = self._destroy(remaining)
            for conn in remaining:
                reasons[conn] = failures.get(conn, f"still established after {attempt + 1} attempt(s) of ss -K")
            try:
                now = self.matching(selection, console_ports)
            except CutError as exc:
                raise _not_checked(result, seen, remaining, str(exc)) from None
            seen += [conn for conn in now if conn not in seen]
            remaining = now
            if not remaining:
                break
            self.sleep(0.05 * (attempt + 1))
        result["cut"] = [conn.report() for conn in seen if conn not in remaining]
        result["remaining"] = [conn.report() for conn in remaining]
        failed = [(conn, reasons.get(conn, "came in during the cut, after its last attempt")) for conn in remaining]
        result["failed"] = [dict(conn.report(), reason=reason) for conn, reason in failed]
        result["verified"] = not remaining
        if remaining:
            raise CutError(f"{len(remaining)} of {len(seen)} console connection(s) could not be cut (the others "
                           f"were): " + "; ".join(f"{conn}: {reason}" for conn, reason in failed[:20]), result)
        return result


def _not_checked(result: dict[str, Any], seen: Sequence[Connection], attempted: Sequence[Connection],
                 error: str) -> CutError:
    """The error when the listing after a cut attempt failed: the connections attempted are
    not known to be gone, and are reported as failed; those gone before count as cut."""
    result["cut"] = [conn.report() for conn in seen if conn not in attempted]
    result["failed"] = [dict(conn.report(), reason=f"not checked: {error}") for conn in attempted]
    return CutError(f"{len(attempted)} console connection(s) could not be checked to be gone: {error}", result)
