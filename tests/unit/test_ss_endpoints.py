"""Every endpoint form ss prints (module_utils.ss_endpoints), read from ss output captured on real
sockets, and the filter form ss takes back.

The fixtures in fixtures/ss_endpoints were captured with fixtures/ss_endpoints/capture.sh (iproute2
6.1, Debian 12, as root): two network namespaces joined by a veth pair hv0/cl0 with IPv4, ULA and
the link-local addresses the kernel gives a veth (accept_dad=0 on both ends); listeners named like
QEMU on :: (dual stack), on :: IPv6 only, on an IPv4 address, bound to lo with SO_BINDTODEVICE
(0.0.0.0, :: IPv6 only, :: dual stack) and on the hypervisor's link-local address; clients over
link-local, IPv4 (seen as IPv4-mapped on the dual-stack socket), ULA and loopback. Then
``ss -t -l -n -p -H`` (ss_listening.txt) and ``ss -t -n -H state established``
(ss_established.txt) in the hypervisor's namespace.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.console_ports import Listener, parse_listening
from ansible_collections.virtguard.console.plugins.module_utils.ss_endpoints import (
    Endpoint,
    filter_address,
    parse_endpoint,
)
from ansible_collections.virtguard.console.plugins.module_utils.tcp_cut import Connection, parse_established

FIXTURES = Path(__file__).parent / "fixtures" / "ss_endpoints"
LISTENING = (FIXTURES / "ss_listening.txt").read_text()
ESTABLISHED = (FIXTURES / "ss_established.txt").read_text()
HOST_LL, CLIENT_LL = "fe80::5ca1:5dff:fee7:c79", "fe80::78f4:65ff:fe0a:7f4b"  # hv0's and cl0's


@pytest.mark.parametrize("text, endpoint", [
    ("10.9.0.1:5906", Endpoint("10.9.0.1", 5906)),
    ("[fd77:9::1]:5901", Endpoint("fd77:9::1", 5901)),
    ("[::ffff:10.9.0.1]:5901", Endpoint("::ffff:10.9.0.1", 5901)),
    ("*:5901", Endpoint("*", 5901)),
    ("[::]:5905", Endpoint("::", 5905)),
    ("0.0.0.0:*", Endpoint("0.0.0.0", None)),
    ("[::]:*", Endpoint("::", None)),
    (f"[{HOST_LL}]%hv0:5901", Endpoint(HOST_LL, 5901, "hv0")),
    ("0.0.0.0%lo:5902", Endpoint("0.0.0.0", 5902, "lo")),
    ("[::]%lo:5903", Endpoint("::", 5903, "lo")),
    ("*%lo:5904", Endpoint("*", 5904, "lo")),
    ("127.0.0.1%lo:5902", Endpoint("127.0.0.1", 5902, "lo")),
    ("[::ffff:127.0.0.1]%lo:5904", Endpoint("::ffff:127.0.0.1", 5904, "lo")),
    # older ss versions: IPv6 without brackets; a zone inside the brackets
    (":::22", Endpoint("::", 22)),
    ("fe80::1%eth0:22", Endpoint("fe80::1", 22, "eth0")),
    ("[fe80::1%eth0]:22", Endpoint("fe80::1", 22, "eth0")),
    # interface names may hold "]" (the kernel refuses only "/", ":" and white space); the bound
    # interface after the brackets is the socket's, whatever zone is inside (mutation testing, issue 21)
    (f"[{HOST_LL}]%v]1:5901", Endpoint(HOST_LL, 5901, "v]1")),
    ("[fe80::1%eth0]%hv0:22", Endpoint("fe80::1", 22, "hv0")),
])
def test_every_form_ss_prints_is_read(text, endpoint):
    assert parse_endpoint(text) == endpoint


def test_the_captured_listeners_are_read_with_their_ports():
    assert sorted(parse_listening(LISTENING)) == sorted([
        Listener("10.9.0.1", 5906, ("qemu-system-x86",)),
        Listener("0.0.0.0", 5902, ("qemu-system-x86",)),
        Listener(HOST_LL, 22, ("sshd",)),
        Listener("::", 5905, ("qemu-system-x86",)),
        Listener("*", 5904, ("qemu-system-x86",)),
        Listener("::", 5903, ("qemu-system-x86",)),
        Listener("*", 5901, ("qemu-system-x86",)),
    ])


def test_the_captured_connections_are_read_with_the_interface_of_their_socket():
    connections = parse_established(ESTABLISHED)
    assert len(connections) == len(ESTABLISHED.splitlines()) == 16
    # the zone is on the local end only: the socket's bound interface
    assert Connection(HOST_LL, 5901, CLIENT_LL, 38314, "hv0") in connections
    assert Connection(HOST_LL, 5905, CLIENT_LL, 59392, "hv0") in connections
    assert Connection("::ffff:10.9.0.1", 5901, "::ffff:10.9.0.3", 53237, None) in connections
    assert Connection("fd77:9::1", 5901, "fd77:9::2", 35422, None) in connections
    assert Connection("10.9.0.1", 5906, "10.9.0.2", 47195, None) in connections
    assert Connection("127.0.0.1", 5902, "127.0.0.1", 47120, "lo") in connections
    assert Connection("::ffff:127.0.0.1", 5904, "::ffff:127.0.0.1", 35090, "lo") in connections
    assert Connection("::1", 5903, "::1", 44890, "lo") in connections
    assert Connection("127.0.0.1", 47120, "127.0.0.1", 5902, None) in connections  # the client's own end
    # no bracket, no zone left in any address
    assert not [c for c in connections if set("[]%") & set(c.local_address + c.peer_address)]


@pytest.mark.parametrize("address, port, word", [
    ("10.9.0.1", 5906, "10.9.0.1:5906"),
    ("::ffff:10.9.0.1", 5901, "[::ffff:10.9.0.1]:5901"),
    (HOST_LL, 5901, f"[{HOST_LL}]:5901"),
    (f"{HOST_LL}%hv0", 5901, f"[{HOST_LL}]:5901"),  # ss refuses a zone in an address
])
def test_filter_addresses_are_what_ss_takes(address, port, word):
    assert filter_address(address, port) == word
