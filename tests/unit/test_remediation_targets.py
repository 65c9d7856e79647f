"""Every watched hypervisor has a host that can remediate it, checked at start against the
inventory as ansible-core reads it (a real inventory file, ansible's own InventoryManager)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.classify_filter import FilterState, source_uris
from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import ArgumentError
from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_targets import (
    check_remediation_targets,
    missing_targets,
    read_inventory,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.rulebook_context import (
    FilterLoad,
    RulebookInventory,
)

INVENTORY = """
all:
  hosts:
    localhost:
  children:
    hypervisors:
      hosts:
        kvm1:
        kvm[2:3]:
    others:
      hosts:
        bastion:
"""


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    return path


def test_the_inventory_is_read_as_ansible_reads_it(inventory_file):
    inventory = read_inventory(str(inventory_file))
    assert inventory.hosts == {"localhost", "kvm1", "kvm2", "kvm3", "bastion"}
    assert inventory.groups["hypervisors"] == {"kvm1", "kvm2", "kvm3"}


def test_a_uri_whose_host_the_inventory_lacks_is_named(inventory_file):
    inventory = read_inventory(str(inventory_file))
    uris = ["qemu+tls://kvm1/system", "qemu+ssh://root@kvm9/system", "qemu:///system",
            "qemu+tls://10.0.0.5/system"]
    problems = missing_targets(uris, {"10.0.0.5": "kvm2"}, inventory)
    assert len(problems) == 1
    assert "qemu+ssh://root@kvm9/system" in problems[0] and "'kvm9'" in problems[0]
    # a map to a host the inventory lacks is the case the issue found
    mapped = missing_targets(["qemu+tls://kvm1/system"], {"kvm1": "kvm1-mgmt"}, inventory)
    assert len(mapped) == 1 and "'kvm1-mgmt'" in mapped[0]


def test_localhost_needs_no_inventory_entry(tmp_path):
    path = tmp_path / "inventory.yml"
    path.write_text("all:\n  hosts:\n    kvm1:\n")
    assert missing_targets(["qemu:///system", "qemu+unix:///session?socket=/x"], {}, read_inventory(str(path))) == []


def test_fleet_scope_needs_the_serving_host_in_the_fleet_group(inventory_file):
    inventory = read_inventory(str(inventory_file))
    assert missing_targets(["qemu+tls://kvm2/system"], {}, inventory, "hypervisors") == []
    outside = missing_targets(["qemu+tls://bastion/system"], {}, inventory, "hypervisors")
    assert len(outside) == 1 and "not in the fleet group 'hypervisors'" in outside[0]
    empty = missing_targets(["qemu+tls://kvm2/system"], {}, inventory, "nosuchgroup")
    assert len(empty) == 1 and "'nosuchgroup' has no hosts" in empty[0]


def test_the_filter_refuses_to_start_and_names_the_uri_and_the_host(inventory_file):
    state = FilterState.from_arguments({"trusted_networks": [], "host_map": {"qemu+tls://kvm1/system": "kvm7"}})
    with pytest.raises(ArgumentError, match=r"qemu\+tls://kvm1/system is remediated by host 'kvm7'"):
        check_remediation_targets(state, ["qemu+tls://kvm1/system"], RulebookInventory(str(inventory_file)))
    check_remediation_targets(state, ["qemu+tls://kvm3/system"], RulebookInventory(str(inventory_file)))


def test_without_remediation_or_inventory_nothing_stops_the_start(inventory_file, caplog):
    audit_only = FilterState.from_arguments({"remediation": False})
    check_remediation_targets(audit_only, ["qemu+tls://kvm9/system"], RulebookInventory(str(inventory_file)))
    state = FilterState.from_arguments({"trusted_networks": []})
    check_remediation_targets(state, ["qemu+tls://kvm9/system"], RulebookInventory(None, "worker mode"))
    assert "cannot check that every hypervisor has a remediating host: worker mode" in caplog.text
    assert "kvm9" in caplog.text


def test_an_inventory_that_cannot_be_read_stops_the_start(tmp_path):
    state = FilterState.from_arguments({"trusted_networks": []})
    with pytest.raises(ArgumentError, match="cannot be read"):
        check_remediation_targets(state, ["qemu:///system"], RulebookInventory(str(tmp_path / "missing.yml")))


def test_the_source_uris_are_rendered_as_the_source_renders_them():
    load = FilterLoad("virtguard.console.classify", {}, {"vg_uri": ["qemu:///system", "qemu+tls://kvm1/system"]},
                      {"uri": "{{ vg_uri }}"})
    assert source_uris(load) == ["qemu:///system", "qemu+tls://kvm1/system"]
    assert source_uris(FilterLoad("f", {}, {}, {"uri": "qemu+ssh://kvm2/system"})) == ["qemu+ssh://kvm2/system"]
    assert source_uris(FilterLoad("f", {}, {}, {})) == ["qemu:///system"]
