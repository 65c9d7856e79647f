# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cutting console connections on the hypervisor host: the kernel destroys the TCP socket
(``ss -K``, ``SOCK_DESTROY``), the client gets a reset at once and QEMU sees its client go
(libvirt then emits the graphics ``disconnect``).

Which connections: established TCP connections whose peer is the given client address (an
IPv4 client of a dual-stack listener shows as ``::ffff:a.b.c.d`` and matches its IPv4 form),
whose local port is one of the console ports *and* has a listening socket (so only accepted
console connections, never this host's own outgoing connections), optionally only the one
with the given client port.

``ss -K`` exits 0 whether or not it destroyed anything, so the result is checked by listing
again: the connections must be gone (retried once, then an error).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import time

from ansible_collections.virtguard.console.plugins.module_utils.console_policy import (
    PolicyError,
    normalize_address,
    parse_port_ranges,
)

Connection = collections.namedtuple("Connection", "local_address local_port peer_address peer_port")

SS_ESTABLISHED = ["ss", "-t", "-n", "-H", "state", "established"]
SS_LISTENING = ["ss", "-t", "-n", "-H", "-l"]


class CutError(Exception):
    """The connections could not be listed or are still there after the cut."""


def split_endpoint(text):
    """``1.2.3.4:5900``, ``[::ffff:1.2.3.4]:5900``, ``*:5900``, ``[fe80::1%eth0]:22`` ->
    (address as ss prints it, port)."""
    host, _sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port) if port.isdigit() else None


def parse_ss(output, listening=False):
    """ss's ``-H`` lines as connections (or, with ``listening``, the set of listening ports)."""
    connections = []
    ports = set()
    for line in output.splitlines():
        fields = line.split()
        if listening:
            # State Recv-Q Send-Q Local Peer
            if len(fields) >= 4:
                ports.add(split_endpoint(fields[3])[1])
            continue
        # Recv-Q Send-Q Local Peer (state filter given, so no State column)
        if len(fields) < 4:
            continue
        local, local_port = split_endpoint(fields[2])
        peer, peer_port = split_endpoint(fields[3])
        if local_port is None or peer_port is None:
            continue
        connections.append(Connection(local, local_port, peer, peer_port))
    return ports if listening else connections


def _ss_address(address):
    return "[%s]" % address if ":" in address else address


class ConnectionCutter:
    """Lists and destroys console connections, through ``run(argv, data=None) -> (rc, out, err)``."""

    def __init__(self, run, sleep=time.sleep):
        self.run = run
        self.sleep = sleep

    def _ss(self, argv):
        rc, out, err = self.run(argv)
        if rc != 0:
            raise CutError("%s failed (rc %d): %s" % (" ".join(argv), rc, err.strip()))
        return out

    def matching(self, address, ports, client_port=None):
        """The console connections from ``address`` (optionally only from ``client_port``)."""
        target = normalize_address(str(address))
        if target is None:
            raise CutError("%r is not an IP address" % (address,))
        try:
            ranges = parse_port_ranges(ports)
        except PolicyError as exc:
            raise CutError(str(exc))
        listening = parse_ss(self._ss(SS_LISTENING), listening=True)
        found = []
        for conn in parse_ss(self._ss(SS_ESTABLISHED)):
            if normalize_address(conn.peer_address) != target:
                continue
            if client_port is not None and conn.peer_port != int(client_port):
                continue
            if conn.local_port not in listening:
                continue
            if not any(low <= conn.local_port <= high for low, high in ranges):
                continue
            found.append(conn)
        return found

    def _destroy(self, connections):
        """One ``ss -K`` per peer address form, matching exactly the connections' ports."""
        by_peer = collections.OrderedDict()
        for conn in connections:
            by_peer.setdefault(conn.peer_address, []).append(conn)
        for peer, conns in by_peer.items():
            expression = []
            for conn in conns:
                if expression:
                    expression.append("or")
                expression += ["(", "sport", "=", ":%d" % conn.local_port,
                               "and", "dport", "=", ":%d" % conn.peer_port, ")"]
            self._ss(["ss", "-t", "-n", "-H", "-K", "state", "established",
                      "dst", _ss_address(peer), "("] + expression + [")"])

    def cut(self, address, ports, client_port=None, check_mode=False, verify_attempts=3):
        """Destroy the matching connections and check they are gone; return the result."""
        found = self.matching(address, ports, client_port)
        result = {
            "changed": bool(found),
            "address": str(normalize_address(str(address))),
            "client_port": None if client_port is None else int(client_port),
            "cut": [conn._asdict() for conn in found],
            "remaining": [],
            "verified": not check_mode,
        }
        if check_mode or not found:
            return result
        wanted = set(found)
        remaining = list(found)
        for attempt in range(verify_attempts):
            self._destroy(remaining)
            still = set(self.matching(address, ports, client_port))
            remaining = [c for c in found if c in still and c in wanted]
            if not remaining:
                return result
            self.sleep(0.05 * (attempt + 1))
        result["remaining"] = [conn._asdict() for conn in remaining]
        result["verified"] = False
        raise CutError("%d connection(s) from %s are still established after %d attempts: %s" % (
            len(remaining), address, verify_attempts,
            ", ".join("%s:%d" % (c.peer_address, c.peer_port) for c in remaining)))
