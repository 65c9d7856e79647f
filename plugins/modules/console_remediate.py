#!/usr/bin/python
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: console_remediate
short_description: Block a batch of client networks from the console ports, then cut their console connections
version_added: 0.2.0
description:
  - What M(virtguard.console.console_block) and then M(virtguard.console.console_cut) do, in one
    module run on the hypervisor host. The console ports are found once, the batch is blocked
    in one C(nft -f -) transaction, then every console connection from it is destroyed with
    C(ss -K) and checked to be gone.
  - O(sessions) are cut too, each exactly (that one connection), and never blocked. A run may
    carry only O(sessions); with no O(addresses) nothing is blocked (RV(block) says C(skipped)).
  - "The cut goes connection by connection when it has to: one that cannot be cut never keeps
    the others from being cut. Whatever could not be cut is in RV(cut.failed) with its reason,
    and the module then fails."
  - One module run instead of two saves a module start (most of a task's cost) between the
    block and the cut, which is the time an offending client keeps its session.
  - The cut runs even when the block failed (a full set, no C(nft)); both results are returned
    separately (RV(block), RV(cut)) for the audit, and the module fails when either failed.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
  - virtguard.console.console_remediation
  - virtguard.console.console_remediation.sessions
attributes:
  check_mode:
    support: full
    details: Reports what the block would add and which connections the cut would destroy.
  diff_mode:
    support: none
options:
  addresses:
    default: []
  timeout:
    description: How long the networks stay blocked, in seconds, from 1 to 86400000.
    type: int
    default: 600
  table:
    description: The nftables table (family C(inet)) that holds the block.
    type: str
    default: virtguard
  set_size:
    description:
      - Elements each block set holds at most. When the batch does not fit, wider networks
        cover it, then blocks closest to expiry are lifted, as
        M(virtguard.console.console_block) describes.
    type: int
    default: 65536
  protected_networks:
    description:
      - Networks (CIDR) and addresses that a full set never covers with a wider network (the
        trusted networks, the console proxies); the items of O(addresses) are blocked as given.
    type: list
    elements: str
    default: []
  verify_attempts:
    description: How many times to destroy and re-check the connections before failing.
    type: int
    default: 3
"""

EXAMPLES = r"""
- name: Block and cut a batch of console clients
  virtguard.console.console_remediate:
    addresses: [203.0.113.7, "2001:db8:1:2::/64"]
    timeout: 600

- name: Cut one session of a console proxy that must never be blocked, with a batch to block
  virtguard.console.console_remediate:
    addresses: [203.0.113.7]
    sessions:
      - address: 127.0.0.1
        client_port: 51234
        console_port: 5901
"""

RETURN = r"""
block:
  description:
    - C(ok), C(msg) when it failed, and the block's result as M(virtguard.console.console_block)
      returns it; C(skipped) when there were no O(addresses) to block (only O(sessions)).
  returned: always
  type: dict
cut:
  description:
    - C(ok), C(msg) when it failed, and the cut's result as M(virtguard.console.console_cut)
      returns it, among which C(cut), C(remaining), C(verified), C(sessions) and C(failed).
  returned: always
  type: dict
  contains:
    failed:
      description:
        - The connections that could not be cut, each with its C(reason) (the error of its own
          C(ss -K), or that it was still established after O(verify_attempts)); every other
          connection was cut. Empty when the cut succeeded.
      returned: always
      type: list
      elements: dict
      sample:
        - {"local_address": "fe80::5ca1:5dff:fee7:c79", "local_port": 5901,
           "peer_address": "fe80::78f4:65ff:fe0a:7f4b", "peer_port": 38314,
           "reason": "ss -K failed (rc 1): Cannot parse device."}
ports:
  description: The console ports blocked and cut (found on the host, plus O(ports)).
  returned: always
  type: list
  elements: str
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.client_batch import sessions_argument_spec
from ansible_collections.virtguard.console.plugins.module_utils.console_ports import (
    DEFAULT_CONSOLE_PROCESSES,
    SS_LISTENING,
    ports_to_protect,
)
from ansible_collections.virtguard.console.plugins.module_utils.host_commands import module_runner, reusing_output
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    DEFAULT_SET_SIZE,
    AddressError,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_block import (
    BlockTable,
    SetFullError,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_output import NftablesError
from ansible_collections.virtguard.console.plugins.module_utils.tcp_cut import (
    ConnectionCutter,
    CutError,
    parse_sessions,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            addresses=dict(type="list", elements="str", default=[]),
            sessions=sessions_argument_spec(),
            ports=dict(type="list", elements="str", default=[]),
            discover_ports=dict(type="bool", default=True),
            console_processes=dict(type="list", elements="str", default=list(DEFAULT_CONSOLE_PROCESSES)),
            timeout=dict(type="int", default=600),
            table=dict(type="str", default="virtguard"),
            set_size=dict(type="int", default=DEFAULT_SET_SIZE),
            protected_networks=dict(type="list", elements="str", default=[]),
            verify_attempts=dict(type="int", default=3),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        parse_sessions(params["sessions"])  # checked before anything runs
    except CutError as exc:
        module.fail_json(msg=str(exc))
    # the block finds the ports QEMU listens on, and the cut keeps the configured ranges' ports
    # that something listens on: one listing serves both
    run = reusing_output(module_runner(module), SS_LISTENING)

    try:
        ports, _discovered, warning = ports_to_protect(run, params["ports"], params["discover_ports"],
                                                       params["console_processes"])
    except AddressError as exc:
        module.fail_json(msg=f"ports: {exc}")
    if warning:
        module.warn(warning)

    block: dict[str, Any] = {"ok": True}
    try:
        table = BlockTable(run, table=params["table"], set_size=params["set_size"])
        if params["addresses"]:
            block.update(table.block(params["addresses"], params["timeout"], ports, check_mode=module.check_mode,
                                     protected=params["protected_networks"]))
        else:  # only sessions: they are cut, never blocked
            block.update(changed=False, skipped=True, blocked=[])
    except SetFullError as exc:
        block.update(exc.result, ok=False, msg=str(exc))
    except (NftablesError, AddressError) as exc:
        block.update(ok=False, msg=str(exc))
    for warning in block.pop("warnings", []):
        module.warn(warning)

    # the cut runs whatever became of the block: a failed block must never leave a session open
    cut: dict[str, Any] = {"ok": True}
    try:
        cut.update(ConnectionCutter(run).cut(params["addresses"], ports, discover_ports=False,
                                             check_mode=module.check_mode,
                                             verify_attempts=max(1, params["verify_attempts"]),
                                             sessions=params["sessions"]))
    except CutError as exc:
        cut.update(exc.result, ok=False, msg=str(exc))

    changed = bool(block.get("changed") or cut.get("changed"))
    result = {"changed": changed, "block": block, "cut": cut, "ports": ports}
    if not (block["ok"] and cut["ok"]):
        failed = [f"{name}: {part['msg']}" for name, part in (("block", block), ("cut", cut)) if not part["ok"]]
        module.fail_json(msg="; ".join(failed), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
