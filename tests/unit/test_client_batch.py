"""The batch options of console_block and console_cut: one spec for both, the batch they name."""

from __future__ import annotations

from ansible_collections.virtguard.console.plugins.module_utils.client_batch import (
    batch_addresses,
    batch_argument_spec,
)
from ansible_collections.virtguard.console.plugins.module_utils.console_ports import DEFAULT_CONSOLE_PROCESSES


def test_the_spec_declares_the_documented_options_afresh_each_time():
    first, second = batch_argument_spec(), batch_argument_spec()
    assert set(first) == {"addresses", "address", "ports", "discover_ports", "console_processes"}
    assert first["console_processes"]["default"] == list(DEFAULT_CONSOLE_PROCESSES)
    first["ports"]["default"].append("5900")
    assert second["ports"]["default"] == [] and batch_argument_spec()["ports"]["default"] == []


def test_the_batch_is_the_addresses_or_the_one_address_of_0_1_0():
    assert batch_addresses({"addresses": ["192.0.2.7", "2001:db8::/64"], "address": None}) == [
        "192.0.2.7", "2001:db8::/64"]
    assert batch_addresses({"addresses": [], "address": None}) == []
    assert batch_addresses({"addresses": None, "address": "192.0.2.7"}) == ["192.0.2.7"]
