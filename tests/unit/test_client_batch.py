"""The batch options of console_block and console_cut: one spec for both, the doc fragment's options as
documented, and the batch they name."""

from __future__ import annotations

from typing import Any

import yaml

from ansible_collections.virtguard.console.plugins.doc_fragments.console_remediation import ModuleDocFragment
from ansible_collections.virtguard.console.plugins.module_utils.client_batch import (
    batch_addresses,
    batch_argument_spec,
    sessions_argument_spec,
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


# -- the specs are the doc fragment's options, as documented --------------------------------------
def fragment_options(part: str) -> dict[str, Any]:
    options: dict[str, Any] = yaml.safe_load(getattr(ModuleDocFragment, part))["options"]
    return options


def declared(documented: dict[str, Any]) -> dict[str, Any]:
    """What an argument spec holds for a documented option: its type, elements, default,
    required flag and suboptions (the description aside)."""
    keys = ("type", "elements", "default", "required")
    spec: dict[str, Any] = {key: documented[key] for key in keys if key in documented}
    if "suboptions" in documented:
        spec["options"] = {name: declared(sub) for name, sub in documented["suboptions"].items()}
    return spec


def test_the_batch_spec_is_the_documented_options_and_the_deprecated_address():
    documented = fragment_options("DOCUMENTATION")
    documented["address"] = fragment_options("SINGLE_ADDRESS")["address"]
    expected = {name: declared(option) for name, option in documented.items()}
    expected["address"].update(removed_in_version="1.0.0", removed_from_collection="virtguard.console")
    assert batch_argument_spec() == expected


def test_the_sessions_spec_is_the_documented_option_with_its_suboptions():
    expected = declared(fragment_options("SESSIONS")["sessions"])
    assert sessions_argument_spec() == expected
    assert sessions_argument_spec()["options"]["address"] == {"type": "str", "required": True}
    assert sessions_argument_spec() is not sessions_argument_spec()  # a fresh one each time
