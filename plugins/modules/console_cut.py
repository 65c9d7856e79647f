#!/usr/bin/python
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: console_cut
short_description: Cut the console (VNC, SPICE) connections of a batch of client addresses on the hypervisor host
version_added: 0.1.0
description:
  - Destroys, with C(ss -K), every established TCP connection whose peer lies in one of
    O(addresses) (addresses or networks, compared as IP address values) and whose local port is
    a console port of this host; the kernel closes the socket under QEMU, the client gets a
    reset at once and libvirt reports the session's C(disconnect).
  - The console ports are those a console process listens on (O(discover_ports)) and the
    O(ports) on which something listens; never this host's own outgoing connections. With
    O(client_port), only the connection from that client port.
  - O(sessions) name connections exactly (client address and port, and the console port). Only
    those are cut, never the address's other connections.
  - Connections still waiting in QEMU's accept queue (QEMU's VNC listener has a backlog of 1)
    are established sockets on the listening port and are cut too.
  - One listing for the whole batch; the C(ss -K) commands name each connection exactly (local
    and peer address and port, and the interface of a socket bound to one, such as a link-local
    client's, by its index, C(dev = 3), because ss refuses an address with a zone), a bounded
    number per command.
  - One connection never keeps the others from being cut. ss refuses a whole command when it
    cannot read one of its words, so a refused command is run again one connection at a time.
  - "C(ss -K) exits 0 even when it closed nothing, so the module lists the connections again,
    cuts what is still there (a connection that came in meanwhile included). A connection still
    there after O(verify_attempts), or whose own command ss refused, is in RV(not_cut) with its
    reason; the module then fails, after every other connection was cut."
  - Block the addresses first (M(virtguard.console.console_block)), or a client can reconnect
    between the cut and the block; cut even when the block failed.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
  - virtguard.console.console_remediation
  - virtguard.console.console_remediation.single_address
  - virtguard.console.console_remediation.sessions
attributes:
  check_mode:
    support: full
    details: Lists the connections it would cut.
  diff_mode:
    support: none
options:
  client_port:
    description: Cut only the connections from this client port; default, every console connection of O(addresses).
    type: int
  verify_attempts:
    description: How many times to destroy and re-check before failing.
    type: int
    default: 3
requirements:
  - A kernel with C(CONFIG_INET_DIAG_DESTROY).
"""

EXAMPLES = r"""
- name: Cut every console connection of a batch of clients (after blocking them)
  virtguard.console.console_cut:
    addresses:
      - 203.0.113.7
      - 2001:db8:1:2::/64

- name: Cut one session only, on its console port even if no QEMU process is found
  virtguard.console.console_cut:
    addresses: [2001:db8::7]
    client_port: 51234
    ports: ["5901"]

- name: Cut two exact sessions, keeping their addresses' other connections
  virtguard.console.console_cut:
    sessions:
      - {address: 127.0.0.1, client_port: 51234, console_port: 5901}
      - {address: "fe80::7", client_port: 40112}
"""

RETURN = r"""
cut:
  description: The connections cut (in check mode, that would be cut), as this host saw them.
  returned: always
  type: list
  elements: dict
  sample:
    - {"local_address": "::ffff:192.0.2.1", "local_port": 5901,
       "peer_address": "::ffff:203.0.113.7", "peer_port": 51234}
remaining:
  description: The connections still established after the last attempt (the module then fails).
  returned: always
  type: list
  elements: dict
not_cut:
  description:
    - The connections that could not be cut, each with its C(reason) (the error of its own C(ss -K),
      or that it was still established after O(verify_attempts)); every other connection was cut,
      and the module failed. Empty when the cut succeeded.
    - M(virtguard.console.console_remediate) returns the same list as C(cut.failed). Here the
      name C(failed) is Ansible's own (whether the task failed).
  returned: always
  type: list
  elements: dict
  sample:
    - {"local_address": "::ffff:192.0.2.1", "local_port": 5901, "peer_address": "::ffff:203.0.113.7",
       "peer_port": 51234, "reason": "still established after 3 attempt(s) of ss -K"}
sessions:
  description: The O(sessions) acted on, normalised (the address as in RV(addresses)).
  returned: always
  type: list
  elements: dict
  sample:
    - {"address": "127.0.0.1", "client_port": 51234, "console_port": 5901}
addresses:
  description:
    - The client networks acted on, normalised (IPv4-mapped IPv6 as IPv4; a single address without its prefix length).
  returned: always
  type: list
  elements: str
address:
  description: With O(address), that address normalised.
  returned: when O(address) is given
  type: str
client_port:
  description: The client port given, or null.
  returned: always
  type: int
ports:
  description: The console ports considered (listening console-process ports and listening O(ports)).
  returned: always
  type: list
  elements: str
  sample: ["5787", "5907", "5930"]
verified:
  description: Whether the connections were checked to be gone afterwards (false in check mode).
  returned: always
  type: bool
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.client_batch import (
    batch_addresses,
    batch_argument_spec,
    sessions_argument_spec,
)
from ansible_collections.virtguard.console.plugins.module_utils.tcp_cut import (
    ConnectionCutter,
    CutError,
)


def returned(result: dict[str, Any]) -> dict[str, Any]:
    """The cut's result as this module returns it: its ``failed`` as ``not_cut``, because
    Ansible reads a module's ``failed`` as whether the task failed."""
    if "failed" in result:
        result = dict(result)
        result["not_cut"] = result.pop("failed")
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            batch_argument_spec(),
            client_port=dict(type="int"),
            verify_attempts=dict(type="int", default=3),
            sessions=sessions_argument_spec(),
        ),
        mutually_exclusive=[("addresses", "address")],
        supports_check_mode=True,
    )
    ss = module.get_bin_path("ss", required=True)

    def run(argv: list[str], data: str | None = None) -> tuple[int, str, str]:
        rc, out, err = module.run_command([ss, *argv[1:]], data=data)
        return rc, out, err

    params = module.params
    # not required_one_of: the default of sessions ([]) would satisfy it
    if params["addresses"] is None and params["address"] is None and not params["sessions"]:
        module.fail_json(msg="one of the following is required: addresses, address, sessions")
    addresses = batch_addresses(params)
    try:
        result = ConnectionCutter(run).cut(addresses, params["ports"], params["client_port"],
                                           discover_ports=params["discover_ports"],
                                           console_processes=params["console_processes"],
                                           check_mode=module.check_mode,
                                           verify_attempts=max(1, params["verify_attempts"]),
                                           sessions=params["sessions"])
    except CutError as exc:
        module.fail_json(msg=str(exc), **returned(exc.result))
    result = returned(result)
    if params["address"] is not None:
        result["address"] = result["addresses"][0]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
