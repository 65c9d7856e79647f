#!/usr/bin/python
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: console_block
short_description: Block a batch of client addresses and networks from the console ports for a while, with nftables
version_added: 0.1.0
description:
  - Puts every address and network of O(addresses) in an nftables set with a per-element
    timeout, so packets from them to the console ports are answered with a TCP reset until the
    timeout runs out; the kernel then drops the element by itself, nothing has to come back to
    unblock. The whole batch is one atomic C(nft -f -) transaction.
  - The console ports are those found on the host (O(discover_ports)) plus O(ports). They only
    ever accumulate in the table's C(console_ports) set.
  - Keeps its own table (O(table), family C(inet)); other tables are not touched. Single
    addresses go to the sets C(blocked_ipv4) and C(blocked_ipv6); networks to a set per prefix
    length, such as C(blocked_ipv6_p64) for /64 networks, matched through the source address
    masked to that prefix. Each set holds at most O(set_size) elements and has a chain of the
    same name with its rule; the base chain C(input) jumps to each. The table, sets, chains and
    rules are created or repaired in the same transaction that adds the elements.
  - An address inside a network that is already blocked counts as blocked, and that network's
    timeout is restarted (O(refresh)). An element already there gets the full O(timeout) again
    (nftables' C(add element) alone would keep the old expiry on older kernels).
  - "A set never holds more than O(set_size) elements. When the batch does not fit, the set
    makes room by covering its elements, new and already blocked, with wider networks: for each
    set from the longest prefix to the shortest, its elements are grouped by the next wider
    prefix (IPv4 /24, /16, /8; IPv6 /64, /48, /32, /16) and the wider network of the largest
    group replaces the group (in the set of that prefix, which makes room the same way), then
    the next largest, until the set fits. A wider network is blocked for the full O(timeout)
    and is reported in RV(widened) with what it covers; the elements it replaces are deleted
    in the same transaction. Elements without timeout (added by hand) are never replaced."
  - "A wider network never overlaps O(protected_networks), nor the IPv6 ranges whose clients are
    blocked by address alone (IPv4-mapped and IPv4-compatible addresses, NAT64, Teredo). Only
    where no wider network is allowed are blocks lifted early to make room for the batch:
    those closest to their expiry that hold nothing of the batch (RV(evicted)). What still
    does not fit is not blocked (the new elements holding the fewest items of the batch first):
    the module then fails with a message naming the set and its size, with RV(set_full=true)
    and RV(not_blocked), after writing the rest of the batch. Widening and eviction are
    warnings. Block then cut: cut the connections even when the block failed."
  - A table of version 0.1.0 (sets without size) is migrated in the same transaction, its
    blocks carried over with the time they had left.
  - Reads only the sets of the batch's address families and looks nothing else up; the whole
    table is never listed. With nftables 1.0.6, reading a set of 65536 elements takes about a
    second; a batch on small sets takes a few hundredths of a second.
  - With O(state=absent), removes the elements equal to or inside O(addresses) before their
    timeout.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
  - virtguard.console.console_remediation
  - virtguard.console.console_remediation.single_address
attributes:
  check_mode:
    support: full
    details: Reads the sets and reports what it would add, refresh or remove.
  diff_mode:
    support: none
options:
  timeout:
    description:
      - How long the addresses stay blocked, in seconds, from 1 to 86400000 (1000 days; nft
        refuses 100000000 and more).
    type: int
    default: 600
  refresh:
    description: Restart the timeout of an address or network that is already blocked.
    type: bool
    default: true
  state:
    description: V(present) blocks O(addresses), V(absent) lifts their block.
    type: str
    choices: [present, absent]
    default: present
  table:
    description: The nftables table (family C(inet)) that holds the block.
    type: str
    default: virtguard
  set_size:
    description:
      - The most elements each block set holds, from 1 to 2147483647 (larger values are stored
        wrong by nftables 1.0.6). A set of another size is made anew with this size when a batch
        of its address family comes, its elements carried over (those closest to expiry lifted
        first when they do not fit, RV(evicted)).
    type: int
    default: 65536
  protected_networks:
    description:
      - Networks (CIDR) and addresses, IPv4 or IPv6, that a full set never covers with a wider
        network, such as the trusted networks and the console proxies' addresses.
      - Only what the module widens by itself is kept off them; the items of O(addresses) are
        blocked as given.
    type: list
    elements: str
    default: []
requirements:
  - C(nft) (nftables 1.0 or later).
notes:
  - Networks wider than /8 (IPv4) or /16 (IPv6) are refused.
"""

EXAMPLES = r"""
- name: Block a batch of clients and an IPv6 /64 for ten minutes
  virtguard.console.console_block:
    addresses:
      - 198.51.100.7
      - 203.0.113.9
      - 2001:db8:1:2::/64
    timeout: 600

- name: Also protect a port nothing listens on yet
  virtguard.console.console_block:
    addresses: [198.51.100.7]
    ports: ["5900-5999", "6012"]

- name: Lift the block early
  virtguard.console.console_block:
    addresses: [198.51.100.7]
    state: absent
"""

RETURN = r"""
table:
  description: The table that holds the block.
  returned: always
  type: str
  sample: inet virtguard
blocked:
  description:
    - One entry per address or network of the batch that is blocked now. RV(blocked[].network)
      is the element that blocks it (a wider network already blocked, or the item itself),
      RV(blocked[].set) its set, RV(blocked[].until) the time (UTC) the block ends.
    - RV(blocked[].timeout) and RV(blocked[].until) are null for an element without timeout
      (added by hand).
  returned: when O(state=present)
  type: list
  elements: dict
  sample: [{"requested": "2001:db8:1:2::7", "network": "2001:db8:1:2::/64", "set": "blocked_ipv6_p64",
            "family": "ipv6", "timeout": 600, "until": "2025-01-01T10:10:00+00:00", "already_blocked": true}]
  contains:
    requested:
      description: The item of O(addresses), normalised (IPv4-mapped as IPv4, a single address without prefix length).
      type: str
    network:
      description: The element that blocks it, as a network (a single address without prefix length).
      type: str
    set:
      description: The set that holds RV(blocked[].network).
      type: str
    family:
      description: V(ipv4) or V(ipv6).
      type: str
    timeout:
      description: The block's timeout in seconds; null for an element without timeout.
      type: int
    until:
      description: When the block ends (UTC, ISO 8601); null for an element without timeout.
      type: str
    already_blocked:
      description: Whether RV(blocked[].network) was blocked before this run.
      type: bool
unchanged:
  description: Items already blocked and left as they were (O(refresh=false)), with the seconds left.
  returned: when O(state=present)
  type: list
  elements: dict
widened:
  description:
    - The wider networks blocked because a set was full, each with the set that holds it and
      what it covers (items of the batch and blocks it replaced, as networks).
  returned: when O(state=present)
  type: list
  elements: dict
  sample: [{"network": "198.18.1.0/24", "set": "blocked_ipv4_p24", "covers": ["198.18.1.7", "198.18.1.9"]}]
evicted:
  description:
    - The blocks lifted before their timeout to make room, with their set and the seconds they had
      left (null for an element without timeout).
  returned: when O(state=present)
  type: list
  elements: dict
  sample: [{"network": "192.0.2.1", "set": "blocked_ipv4", "expires_in": 12}]
not_blocked:
  description: The items of O(addresses) that found no room in their full set, with the set they would be in.
  returned: when O(state=present)
  type: list
  elements: dict
  sample: [{"network": "192.0.2.5", "set": "blocked_ipv4"}]
set_full:
  description: Whether RV(not_blocked) is not empty (the module then fails).
  returned: when O(state=present)
  type: bool
set_size:
  description: The size of the block sets.
  returned: when O(state=present)
  type: int
ports:
  description: The console ports the table protects after the run (in check mode, would protect).
  returned: when O(state=present)
  type: list
  elements: str
  sample: ["5787", "5900-5999", "6012"]
discovered_ports:
  description: The ports console processes listen on, found on this host (empty without O(discover_ports)).
  returned: when O(state=present)
  type: list
  elements: str
  sample: ["5787", "5907", "5930"]
ruleset_created:
  description: Whether the table did not exist before.
  returned: when O(state=present)
  type: bool
migrated:
  description: The sets made anew (version 0.1.0 shape or another size), their elements carried over.
  returned: when O(state=present)
  type: list
  elements: str
verified:
  description:
    - Whether every element written was found in its set afterwards (false in check mode or when nothing was written).
  returned: when O(state=present)
  type: bool
unblocked:
  description: The elements whose block was lifted.
  returned: when O(state=absent)
  type: list
  elements: str
still_blocked:
  description: Items of O(addresses) that stay blocked because a wider blocked network holds them.
  returned: when O(state=absent)
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.client_batch import (
    batch_addresses,
    batch_argument_spec,
)
from ansible_collections.virtguard.console.plugins.module_utils.console_ports import ports_to_protect
from ansible_collections.virtguard.console.plugins.module_utils.host_commands import module_runner
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    DEFAULT_SET_SIZE,
    AddressError,
    format_port_ranges,
    parse_port_ranges,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_block import (
    BlockTable,
    SetFullError,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_output import NftablesError


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            batch_argument_spec(),
            timeout=dict(type="int", default=600),
            refresh=dict(type="bool", default=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            table=dict(type="str", default="virtguard"),
            set_size=dict(type="int", default=DEFAULT_SET_SIZE),
            protected_networks=dict(type="list", elements="str", default=[]),
        ),
        mutually_exclusive=[("addresses", "address")],
        required_one_of=[("addresses", "address")],
        supports_check_mode=True,
    )
    params = module.params
    addresses = batch_addresses(params)
    run = module_runner(module)
    discovered: set[int] = set()
    try:
        table = BlockTable(run, table=params["table"], set_size=params["set_size"])
        if params["state"] == "absent":
            module.exit_json(**table.unblock(addresses, check_mode=module.check_mode))
        ports, discovered, warning = ports_to_protect(run, params["ports"], params["discover_ports"],
                                                      params["console_processes"])
        if warning:
            module.warn(warning)
        result = table.block(addresses, params["timeout"], ports, refresh=params["refresh"],
                             check_mode=module.check_mode, protected=params["protected_networks"])
    except SetFullError as exc:
        module.fail_json(msg=str(exc), **exc.result)
    except (NftablesError, AddressError) as exc:
        module.fail_json(msg=str(exc))
    result["discovered_ports"] = format_port_ranges(parse_port_ranges(sorted(discovered)))
    for warning in result.pop("warnings", []):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
