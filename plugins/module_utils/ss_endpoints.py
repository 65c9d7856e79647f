# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TCP endpoints as ``ss`` (iproute2) prints them, and as its filters take them back.

Every form ss 6.1 prints, captured from real sockets (tests/unit/fixtures/ss_endpoints)::

    10.9.0.1:5906                       plain IPv4
    [fd77:9::1]:5901                    IPv6, in brackets
    [::ffff:10.9.0.1]:5901              IPv4-mapped (an IPv4 client of a dual-stack socket)
    *:5901  [::]:5905  0.0.0.0:*        wildcards (listeners); ``*`` as a port: any
    [fe80::5ca1:5dff:fee7:c79]%hv0:5901 a socket bound to an interface: a link-local one
    0.0.0.0%lo:5902  [::]%lo:5903  *%lo:5904  127.0.0.1%lo:5902   SO_BINDTODEVICE

The ``%IFACE`` is the socket's bound interface (the kernel's ``idiag_if``), printed after the
address and only on the *local* end: the peer of a link-local connection shows as plain
``[fe80::…]:PORT``. Older ss versions printed IPv6 without brackets (``:::22``,
``fe80::1%eth0:22``); those parse too. Interface names never hold ``:`` or ``%`` (the kernel
refuses them), so the last ``:`` separates the port and the first ``%`` the interface.

ss's filter parser refuses a zone in an address (``[fe80::1%eth0]:22`` and
``[fe80::1]%eth0:22`` are errors that fail the whole command) but matches a link-local
address without it, and takes the interface as a condition of its own (``dev = IFACE``, where
IFACE may be the interface's index): :func:`filter_address` writes the address that way, and
the cut (tcp_cut) adds the interface by index; both checked with ``ss -K`` on real sockets.

Python 3.8+ (the module_utils run on managed hosts), standard library only.
"""

from __future__ import annotations

from typing import NamedTuple


class Endpoint(NamedTuple):
    """One end of a socket: the address as ss prints it without brackets or interface
    (``fe80::1``, ``::ffff:1.2.3.4``, ``*``), the port (None for ``*``), and the interface the
    socket is bound to (None when ss prints none)."""

    address: str
    port: int | None
    interface: str | None = None


def parse_endpoint(text: str) -> Endpoint:
    """``ADDRESS[%IFACE]:PORT`` as ss prints it (any form above) as an Endpoint."""
    host, _sep, port_text = text.rpartition(":")
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else None
    interface: str | None = None
    if host.startswith("["):
        address, _bracket, rest = host[1:].partition("]")
        if rest.startswith("%"):
            interface = rest[1:]
    else:
        address = host
    # a zone inside the brackets, or an unbracketed address of older ss versions
    address, percent, zone = address.partition("%")
    if percent and interface is None:
        interface = zone
    return Endpoint(address, port, interface or None)


def filter_address(address: str, port: int) -> str:
    """An address and port as ss's filters take them: IPv6 in brackets, never with a zone
    (ss refuses one: the interface is a condition of its own, ``dev = INDEX``)."""
    address = address.partition("%")[0]
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
