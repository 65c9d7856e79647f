#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: console_block
short_description: Block a client address from the console ports for a while, with nftables
version_added: 0.1.0
description:
  - Puts O(address) in an nftables set with a per-element timeout, so packets from it to the
    console ports (O(ports)) are answered with a TCP reset until the timeout runs out; the
    kernel then drops the element by itself, nothing has to come back to unblock.
  - Keeps its own table (O(table), family C(inet)) with the sets C(console_ports),
    C(blocked_ipv4) and C(blocked_ipv6) and an C(input) chain; creates or repairs it in the
    same atomic C(nft -f -) transaction that adds the element. Other tables are not touched.
  - An address that is already blocked gets the full O(timeout) again when O(refresh=true)
    (nftables' C(add element) alone would keep the old expiry).
  - With O(state=absent), removes O(address) from the block before its timeout.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
  - virtguard.console.console_remediation
attributes:
  check_mode:
    support: full
    details: Reads the table and reports what it would add, refresh or remove.
  diff_mode:
    support: none
options:
  timeout:
    description: How long the address stays blocked, in seconds.
    type: int
    default: 600
  refresh:
    description: Restart the timeout of an address that is already blocked.
    type: bool
    default: true
  state:
    description: C(present) blocks O(address), C(absent) lifts its block.
    type: str
    choices: [present, absent]
    default: present
  table:
    description: The nftables table (family C(inet)) that holds the block.
    type: str
    default: virtguard
"""

EXAMPLES = r"""
- name: Block a client from the VNC ports for ten minutes
  virtguard.console.console_block:
    address: 203.0.113.7
    timeout: 600

- name: Lift the block early
  virtguard.console.console_block:
    address: 203.0.113.7
    state: absent
"""

RETURN = r"""
table:
  description: The table that holds the block.
  returned: always
  type: str
  sample: inet virtguard
blocked:
  description: The addresses added or refreshed, each with its family, timeout and the time (UTC) it ends.
  returned: when O(state=present)
  type: list
  elements: dict
  sample: [{"address": "203.0.113.7", "family": "ipv4", "timeout": 600,
            "until": "2025-01-01T10:10:00+00:00", "already_blocked": false}]
unchanged:
  description: Addresses already blocked and left as they were (O(refresh=false)), with the seconds left.
  returned: when O(state=present)
  type: list
  elements: dict
ports:
  description: The console ports the block applies to.
  returned: when O(state=present)
  type: list
  elements: str
  sample: ["5900-5999"]
ruleset_created:
  description: Whether the table did not exist before.
  returned: when O(state=present)
  type: bool
unblocked:
  description: The addresses whose block was lifted.
  returned: when O(state=absent)
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.nftables_block import (
    BlockTable,
    NftablesError,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            address=dict(type="str", required=True),
            ports=dict(type="list", elements="str", default=["5900-5999"]),
            timeout=dict(type="int", default=600),
            refresh=dict(type="bool", default=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            table=dict(type="str", default="virtguard"),
        ),
        supports_check_mode=True,
    )
    nft = module.get_bin_path("nft", required=True)

    def run(argv, data=None):
        return module.run_command([nft] + argv[1:], data=data, binary_data=True)

    params = module.params
    try:
        table = BlockTable(run, table=params["table"])
        if params["state"] == "present":
            result = table.block([params["address"]], params["timeout"], params["ports"],
                                 refresh=params["refresh"], check_mode=module.check_mode)
        else:
            result = table.unblock([params["address"]], check_mode=module.check_mode)
    except NftablesError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
