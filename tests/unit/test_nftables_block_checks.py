"""console_block's checks before any nft runs (plugins/module_utils/nftables_block.py), judged
whole: the bounds themselves, and the messages a failed task shows the operator."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    MAX_BLOCK_SECONDS,
    MAX_SET_SIZE,
    MIN_IPV4_PREFIX,
    MIN_IPV6_PREFIX,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_block import (
    BlockTable,
    check_set_size,
    check_timeout,
    parse_networks,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_output import NftablesError


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(NftablesError) as error:
        call(*args, **kwargs)
    return str(error.value)


def test_the_timeout_bounds_are_whole_seconds_from_1_to_the_maximum() -> None:
    assert check_timeout(1) == 1 and check_timeout(MAX_BLOCK_SECONDS) == MAX_BLOCK_SECONDS
    for wrong in (0, MAX_BLOCK_SECONDS + 1, True, 5.0, "600"):
        assert refused(check_timeout, wrong) == (
            f"timeout must be a whole number of seconds from 1 to {MAX_BLOCK_SECONDS} "
            f"(nft refuses 100000000 s and more), got {wrong!r}")


def test_the_set_size_bounds_are_whole_numbers_from_1_to_the_maximum() -> None:
    assert check_set_size(1) == 1 and check_set_size(MAX_SET_SIZE) == MAX_SET_SIZE
    for wrong in (0, MAX_SET_SIZE + 1, False, 2.0, "65535"):
        assert refused(check_set_size, wrong) == (
            f"set_size must be a whole number from 1 to {MAX_SET_SIZE}, got {wrong!r}")


def test_the_widest_networks_allowed_are_the_minimum_prefixes_themselves() -> None:
    widest4, widest6 = f"10.0.0.0/{MIN_IPV4_PREFIX}", f"2001::/{MIN_IPV6_PREFIX}"
    assert parse_networks([widest6, widest4, "10.1.2.3", widest4]) == [
        ipaddress.ip_network(widest4), ipaddress.ip_network(widest6), ipaddress.ip_network("10.1.2.3/32")]
    assert refused(parse_networks, [f"10.0.0.0/{MIN_IPV4_PREFIX - 1}"]) == (
        f"addresses: '10.0.0.0/{MIN_IPV4_PREFIX - 1}' is wider than /{MIN_IPV4_PREFIX}: "
        "blocking it would lock out far too many clients")
    assert refused(parse_networks, [f"2000::/{MIN_IPV6_PREFIX - 1}"]) == (
        f"addresses: '2000::/{MIN_IPV6_PREFIX - 1}' is wider than /{MIN_IPV6_PREFIX}: "
        "blocking it would lock out far too many clients")
    assert refused(parse_networks, ["1.2.3.4; flush ruleset"]) == (
        "addresses: '1.2.3.4; flush ruleset' is neither an IP address nor a network")


class NoNft:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nft must not run")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"table": "bad name"}, "table name 'bad name' must be a letter then letters, digits or _ (at most 31)"),
    ({"table": 7}, "table name 7 must be a letter then letters, digits or _ (at most 31)"),
    ({"chain": "1input"}, "chain name '1input' must be a letter then letters, digits or _ (at most 31)"),
    ({"chain": "blocked_ipv6_p64"}, "chain name 'blocked_ipv6_p64' is the name of a block set's chain"),
    ({"set_size": 0}, f"set_size must be a whole number from 1 to {MAX_SET_SIZE}, got 0"),
])
def test_wrong_table_settings_are_named_in_whole_messages(kwargs: dict[str, Any], message: str) -> None:
    assert refused(BlockTable, NoNft(), **kwargs) == message


def test_a_wrong_block_is_named_before_nft_runs() -> None:
    table = BlockTable(NoNft())
    assert refused(table.block, ["10.0.0.1"], 60, ["59x"]) == (
        "ports: '59x' is neither a port nor a range like 5900-5999")
    assert refused(table.block, ["10.0.0.1"], 0, []).startswith("timeout must be a whole number of seconds")
