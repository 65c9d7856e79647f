"""QEMU's ``query-vnc`` and ``query-spice`` answers, and libvirt's addresses, read field by field:
every address the payload carries is compared whole, defaults included, so that a field read
under another name or defaulted otherwise is a failing test (mutation testing, issue 21)."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils import graphics_event as ge

NOWHERE = {"family": "ipv4", "node": "", "service": ""}  # an address QEMU or libvirt left empty


@pytest.mark.parametrize("raw, expected", [
    ({"family": 0, "node": "192.0.2.1", "service": "5900"}, {"family": "ipv4", "node": "192.0.2.1", "service": "5900"}),
    ({"family": 1, "node": "fe80::1%eth0", "service": 41000}, {"family": "ipv6", "node": "fe80::1%eth0",
                                                               "service": "41000"}),
    ({"family": 2, "node": "/run/vnc.sock", "service": ""}, {"family": "unix", "node": "/run/vnc.sock",
                                                             "service": ""}),
    ({"family": 3, "node": "x", "service": "1"}, {"family": "unknown-3", "node": "x", "service": "1"}),
    ({"family": -1, "node": "x", "service": "1"}, {"family": "unknown--1", "node": "x", "service": "1"}),
    ({}, NOWHERE),
])
def test_libvirts_addresses(raw: dict[str, Any], expected: dict[str, str]) -> None:
    assert ge.address(raw) == expected


def test_phases_outside_libvirts_three_stay_visible() -> None:
    assert [ge.phase_name(n) for n in (-1, 3)] == ["unknown--1", "unknown-3"]


def test_qemus_addresses() -> None:
    assert ge.qemu_address({"family": "ipv6", "host": "::1", "service": "5901"}) == {
        "family": "ipv6", "node": "::1", "service": "5901"}
    assert ge.qemu_address({}) == NOWHERE


def test_a_vnc_answer_without_auth_or_clients() -> None:
    answer = {"enabled": True, "family": "ipv6", "host": "::", "service": "5902",
              "clients": [{"family": "ipv6", "host": "2001:db8::5", "service": "50000"}]}
    [(local, remote, auth, subject, protocol, channels)] = ge.clients_from_query_vnc(answer)
    assert (local, remote, auth, subject, protocol, channels) == (
        {"family": "ipv6", "node": "::", "service": "5902"},
        {"family": "ipv6", "node": "2001:db8::5", "service": "50000"}, "none", [], "vnc",
        [{"family": "ipv6", "node": "2001:db8::5", "service": "50000"}])
    assert ge.clients_from_query_vnc({"enabled": True}) == []
    assert ge.clients_from_query_vnc({"clients": answer["clients"]}) == []  # not enabled
    assert ge.clients_from_query_vnc(None) == []


def test_a_spice_answer_read_whole() -> None:
    # in the form QEMU 7.2 answers: a SPICE server on :: with a plain port only, one IPv6 client
    # of two channels
    answer = {"enabled": True, "migrated": False, "host": "::", "port": 5930, "auth": "sasl",
              "compiled-version": "0.15", "mouse-mode": "server",
              "channels": [{"family": "ipv6", "host": "2001:db8::7", "port": "45001", "tls": False,
                            "connection-id": 11, "channel-type": 2, "channel-id": 0},
                           {"family": "ipv6", "host": "2001:db8::7", "port": "45000", "tls": False,
                            "connection-id": 11, "channel-type": 1, "channel-id": 0}]}
    server = {"family": "ipv6", "node": "::", "service": "5930"}
    main = {"family": "ipv6", "node": "2001:db8::7", "service": "45000"}
    display = {"family": "ipv6", "node": "2001:db8::7", "service": "45001"}
    assert ge.clients_from_query_spice(answer) == [(server, main, "sasl", [], "spice", [main, display])]
    assert ge.spice_channel_locals(answer) == {("2001:db8::7", "45000"): server, ("2001:db8::7", "45001"): server}
    assert ge.spice_ports(answer) == {"5930"}


def test_a_spice_channel_on_the_tls_port_and_fields_qemu_left_out() -> None:
    answer = {"enabled": True, "tls-port": 5931,
              "channels": [{"tls": True, "connection-id": 1, "channel-type": 1},
                           {"family": "ipv4", "host": "192.0.2.9", "port": "46000", "tls": False,
                            "connection-id": 2, "channel-type": 1}]}
    tls_client, plain_client = ge.clients_from_query_spice(answer)
    assert tls_client == ({"family": "ipv4", "node": "", "service": "5931"}, NOWHERE, "none", [], "spice",
                          [NOWHERE])
    # no plain port: the plain channel's server port is unknown, said as ""
    assert plain_client[0] == {"family": "ipv4", "node": "", "service": ""}
    assert ge.spice_channel_locals(answer) == {("", ""): {"family": "ipv4", "node": "", "service": "5931"},
                                               ("192.0.2.9", "46000"): {"family": "ipv4", "node": "", "service": ""}}
    assert ge.spice_ports(answer) == {"5931"}


def test_a_spice_client_without_a_main_channel_is_named_by_its_first_channel() -> None:
    answer = {"enabled": True, "port": 5930, "host": "0.0.0.0",
              "channels": [{"family": "ipv4", "host": "192.0.2.3", "port": "47002", "connection-id": 5,
                            "channel-type": 3},
                           {"family": "ipv4", "host": "192.0.2.3", "port": "47001", "connection-id": 5,
                            "channel-type": 2}]}
    [(local, remote, _auth, _subject, _protocol, channels)] = ge.clients_from_query_spice(answer)
    assert local == {"family": "ipv4", "node": "0.0.0.0", "service": "5930"}
    assert remote["service"] == "47002" and [c["service"] for c in channels] == ["47002", "47001"]


def test_a_disabled_or_missing_spice_server() -> None:
    for answer in ({"enabled": False, "port": 5930, "channels": [{"connection-id": 1}]}, {}, None):
        assert ge.clients_from_query_spice(answer) == []
        assert ge.spice_channel_locals(answer) == {}
        assert ge.spice_ports(answer) == set()
