"""Addresses, blocked networks and port ranges as values (module_utils.ip_addresses)."""

from __future__ import annotations

import ipaddress

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    DEFAULT_SET_SIZE,
    MAX_BLOCK_SECONDS,
    MAX_SET_SIZE,
    AddressError,
    block_network,
    format_port_ranges,
    normalize_address,
    parse_network,
    parse_port_ranges,
    port_in_ranges,
)

A = ipaddress.ip_address
N = ipaddress.ip_network


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.7", A("192.0.2.7")),
    (" 192.0.2.7 ", A("192.0.2.7")),
    ("::ffff:192.0.2.7", A("192.0.2.7")),        # IPv4-mapped: the IPv4 address on the wire
    ("[::ffff:192.0.2.7]", A("192.0.2.7")),
    ("::10.0.0.1", A("::a00:1")),                # IPv4-compatible: stays an IPv6 address
    ("::a00:1", A("::10.0.0.1")),                # the same value written as Python writes it
    ("[::1]", A("::1")),
    ("fe80::1%eth0", A("fe80::1")),              # no scope: it would make equal addresses differ
    ("[fe80::1%eth0]", A("fe80::1")),
    (A("::ffff:10.0.0.1"), A("10.0.0.1")),
])
def test_normalize_address(text, expected):
    assert normalize_address(text) == expected


@pytest.mark.parametrize("text", ["", "x", "192.0.2.300", "1.2.3.4; flush ruleset", "192.0.2.0/24", "[]", None,
                                  3232235521])
def test_normalize_address_says_none_for_what_is_not_an_address(text):
    assert normalize_address(text) is None


def test_a_scoped_address_value_loses_its_scope():
    assert normalize_address(ipaddress.IPv6Address("fe80::1%eth0")) == A("fe80::1")


@pytest.mark.parametrize("text, expected", [
    ("10.1.2.3/8", N("10.0.0.0/8")),                       # host bits allowed
    ("2001:db8:1:2::5/64", N("2001:db8:1:2::/64")),
    ("192.0.2.7", N("192.0.2.7/32")),
    ("::ffff:10.0.0.1", N("10.0.0.1/32")),
    ("::ffff:10.0.0.0/104", N("10.0.0.0/8")),              # an IPv4-mapped network is IPv4
    ("::ffff:0:0/96", N("0.0.0.0/0")),
    ("::10.0.0.1", N("::a00:1/128")),
    ("[::1]", N("::1/128")),
    (N("::ffff:192.0.2.0/120"), N("192.0.2.0/24")),
])
def test_parse_network(text, expected):
    assert parse_network(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.0/33", "nonsense/8", "", "10.0.0.1 or 1", 167772161, ["10.0.0.0/8"]])
def test_parse_network_refuses_with_the_value_named(text):
    with pytest.raises(AddressError, match=repr(text).replace("[", r"\[").replace("]", r"\]")):
        parse_network(text)


@pytest.mark.parametrize("address, prefix, trusted, expected", [
    ("192.0.2.7", 64, (), "192.0.2.7/32"),
    ("::ffff:192.0.2.7", 64, (), "192.0.2.7/32"),
    ("2001:db8:1:2::5", 64, (), "2001:db8:1:2::/64"),
    ("2001:db8:1:2::5", 56, (), "2001:db8:1::/56"),
    ("2a00:db8:1:2::5", 16, (), "2a00::/16"),
    ("2001:db8:1:2::5", 16, (), "2001:db8:1:2::5/128"),  # its /16 holds Teredo
    ("2001:db8:1:2::5", 128, (), "2001:db8:1:2::5/128"),
    # a trusted network inside the /64: only the offender's own address
    ("2001:db8:1:2::5", 64, ["2001:db8:1:2::10/128"], "2001:db8:1:2::5/128"),
    ("2001:db8:1:2::5", 64, [N("2001:db8::/32")], "2001:db8:1:2::5/128"),
    # trusted IPv4 networks do not touch IPv6 prefixes
    ("2001:db8:1:2::5", 64, ["10.0.0.0/8"], "2001:db8:1:2::/64"),
    # prefixes that would span unrelated hosts: IPv4-compatible, NAT64, Teredo
    ("::10.0.0.1", 64, (), "::a00:1/128"),
    ("64:ff9b::c000:207", 64, (), "64:ff9b::c000:207/128"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", 64, (), "2001:0:4136:e378:8000:63bf:3fff:fdd2/128"),
    # link-local: fe80::/64 would shut every link-local client of every link out
    ("fe80::5054:ff:fe12:3456", 64, (), "fe80::5054:ff:fe12:3456/128"),
    ("fe80::5054:ff:fe12:3456%eth0", 48, (), "fe80::5054:ff:fe12:3456/128"),
])
def test_block_network(address, prefix, trusted, expected):
    assert block_network(address, prefix, trusted) == N(expected)


@pytest.mark.parametrize("address, prefix", [("nonsense", 64), ("2001:db8::1", 0), ("2001:db8::1", 15),
                                             ("2001:db8::1", 129), ("2001:db8::1", True), ("2001:db8::1", "64")])
def test_block_network_refuses(address, prefix):
    with pytest.raises(AddressError):
        block_network(address, prefix)


def test_port_ranges_are_sorted_merged_and_formatted():
    ranges = parse_port_ranges([6012, "5901-5910", " 5900 ", "5950 - 5999", "6000", "5905"])
    assert ranges == [(5900, 5910), (5950, 6000), (6012, 6012)]
    assert format_port_ranges(ranges) == ["5900-5910", "5950-6000", "6012"]
    assert parse_port_ranges("5900-5999") == [(5900, 5999)]  # one string is one item
    assert parse_port_ranges(5900) == [(5900, 5900)]
    assert parse_port_ranges([]) == []
    assert port_in_ranges(5950, ranges) and not port_in_ranges(5911, ranges)


@pytest.mark.parametrize("item", [0, "0", 65536, "5999-5900", "59x", "5900,5901", "-5900", "5900-", True, 5900.0,
                                  "٥٩٠٠"])
def test_port_ranges_refuse_with_the_item_named(item):
    with pytest.raises(AddressError, match="ports"):
        parse_port_ranges([item])


def test_limits():
    # measured with nftables 1.0.6: 99999999 s is the largest timeout nft takes
    assert 1 <= MAX_BLOCK_SECONDS <= 99_999_999
    assert DEFAULT_SET_SIZE == 65536
    assert MAX_SET_SIZE == 2**31 - 1
