#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: console_cut
short_description: Cut console (VNC, SPICE) connections of one client address on the hypervisor host
version_added: 0.1.0
description:
  - Destroys the established TCP connections from O(address) to the console ports
    (O(ports)) of this host with C(ss -K); the kernel closes the socket under QEMU, the client
    gets a reset at once and libvirt reports the session's C(disconnect).
  - Only connections accepted by a listening console port are cut, never this host's own
    outgoing connections. With O(client_port), only that one connection.
  - "C(ss -K) exits 0 even when it closed nothing, so the module lists the connections again
    and fails unless they are gone."
  - Block the address first (M(virtguard.console.console_block)), or the client can reconnect
    between the cut and the block.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
  - virtguard.console.console_remediation
attributes:
  check_mode:
    support: full
    details: Lists the connections it would cut.
  diff_mode:
    support: none
options:
  client_port:
    description: Cut only the connection from this client port; default, every console connection of O(address).
    type: int
  verify_attempts:
    description: How many times to destroy and re-check before failing.
    type: int
    default: 3
requirements:
  - C(ss) from iproute2, and a kernel with C(CONFIG_INET_DIAG_DESTROY).
"""

EXAMPLES = r"""
- name: Cut every console connection of a client (after blocking it)
  virtguard.console.console_cut:
    address: 203.0.113.7

- name: Cut one session only
  virtguard.console.console_cut:
    address: 2001:db8::7
    client_port: 51234
    ports: ["5901"]
"""

RETURN = r"""
cut:
  description: The connections cut (in check mode, that would be cut), as this host saw them.
  returned: always
  type: list
  elements: dict
  sample: [{"local_address": "0.0.0.0", "local_port": 5901, "peer_address": "203.0.113.7", "peer_port": 51234}]
address:
  description: The client address, normalised (IPv4-mapped IPv6 as IPv4).
  returned: always
  type: str
verified:
  description: Whether the connections were checked to be gone afterwards (false in check mode).
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.tcp_cut import (
    ConnectionCutter,
    CutError,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            address=dict(type="str", required=True),
            ports=dict(type="list", elements="str", default=["5900-5999"]),
            client_port=dict(type="int"),
            verify_attempts=dict(type="int", default=3),
        ),
        supports_check_mode=True,
    )
    ss = module.get_bin_path("ss", required=True)

    def run(argv, data=None):
        return module.run_command([ss] + argv[1:], data=data)

    params = module.params
    try:
        result = ConnectionCutter(run).cut(params["address"], params["ports"], params["client_port"],
                                           check_mode=module.check_mode,
                                           verify_attempts=max(1, params["verify_attempts"]))
    except CutError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
