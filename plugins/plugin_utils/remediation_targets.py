# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every hypervisor the activation watches must have a host that can remediate it: checked when
the activation starts, not discovered by a playbook run that says "no hosts matched" while an
offender keeps its session.

The remediating host of a URI is ``console_policy.target_host_for`` (the URI's host name,
``localhost`` for a local URI, or what ``host_map`` says); it must be a host of the inventory
ansible-rulebook runs playbooks against. With fleet scope every run goes to the fleet group
(``event.meta.hosts``), so the serving host must also be in that group, or the run would leave
it out.

``localhost`` needs no inventory entry: Ansible's implicit localhost serves a play that names
it. The inventory is read with ansible-core's own ``InventoryManager`` (plugins, groups, ranges
as ansible-playbook reads them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ansible_collections.virtguard.console.plugins.plugin_utils.classify_filter import PLUGIN, FilterState
from ansible_collections.virtguard.console.plugins.plugin_utils.console_policy import target_host_for
from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import ArgumentError
from ansible_collections.virtguard.console.plugins.plugin_utils.rulebook_context import RulebookInventory

LOGGER = logging.getLogger(PLUGIN)

IMPLICIT_HOSTS = frozenset({"localhost"})


@dataclass(frozen=True)
class Inventory:
    """The host names of an inventory, and the host names of each of its groups."""

    source: str
    hosts: frozenset[str]
    groups: Mapping[str, frozenset[str]]


def read_inventory(source: str) -> Inventory:
    """The inventory at ``source`` (a path, as ``ansible-rulebook -i`` takes it), read as
    ansible-playbook reads it. Raises ValueError when it cannot be parsed into hosts."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    if "," not in source and not os.path.exists(source):  # "host1,host2," is a host list, not a path
        raise ValueError(f"{source} does not exist")
    manager = InventoryManager(loader=DataLoader(), sources=[source])
    groups = {name: frozenset(host.name for host in group.get_hosts())
              for name, group in manager.groups.items()}
    return Inventory(source, frozenset(manager.hosts), groups)


def missing_targets(uris: Iterable[str], host_map: Mapping[str, str], inventory: Inventory,
                    fleet_group: str | None = None) -> list[str]:
    """One message per URI whose remediating host the inventory does not have (or, with
    ``fleet_group``, whose host is not in that group); empty when every URI has one."""
    problems: list[str] = []
    group = inventory.groups.get(fleet_group) if fleet_group is not None else None
    if fleet_group is not None and not group:
        return [f"the fleet group {fleet_group!r} has no hosts in the inventory {inventory.source}"]
    for uri in uris:
        target = target_host_for(uri, host_map)
        if fleet_group is not None and group is not None:
            if target not in group:
                problems.append(f"{uri} is remediated by host {target!r}, which is not in the fleet group "
                                f"{fleet_group!r} of the inventory {inventory.source}")
        elif target not in inventory.hosts and target not in IMPLICIT_HOSTS:
            problems.append(f"{uri} is remediated by host {target!r}, which the inventory {inventory.source} "
                            "does not have (add it, or map the URI to an inventory host with virtguard_host_map)")
    return problems


def check_remediation_targets(state: FilterState, uris: list[str], inventory: RulebookInventory) -> None:
    """Stop the start (ArgumentError) when a hypervisor the filter's source watches has no host
    in the inventory that can remediate it; say so in the log when the inventory is not known.
    Nothing to check for a filter that remediates nothing."""
    if not state.remediating:
        return
    if inventory.path is None:
        LOGGER.warning("virtguard: cannot check that every hypervisor has a remediating host: %s; "
                       "check that the job's inventory holds %s", inventory.unknown_because,
                       ", ".join(sorted({state.classifier.target_of(uri) for uri in uris})))
        return
    try:
        hosts = read_inventory(inventory.path)
    except Exception as exc:  # ansible-core's parsers raise their own error types
        raise ArgumentError(f"{PLUGIN}: the inventory {inventory.path} cannot be read: {exc}") from None
    problems = missing_targets(uris, state.host_map, hosts, state.run_hosts)
    if problems:
        raise ArgumentError(f"{PLUGIN}: a watched hypervisor has no host that can remediate it: "
                            + "; ".join(problems))
