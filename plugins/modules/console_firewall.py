#!/usr/bin/python
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: console_firewall
short_description: Refuse new connections to a libvirt host's console ports from outside the allowed networks
version_added: 0.5.0
description:
  - Keeps an nftables table of its own (O(table), family C(inet)) that answers the first packet
    of every new TCP connection to a console port (a SYN) with a TCP reset, unless it comes from
    one of O(allowed_networks). QEMU never accepts such a connection, so no console session and
    no libvirt graphics event exist for it.
  - Only new inbound connections are judged (a SYN alone, conntrack state C(new)). Established
    sessions, and the replies to the host's own outgoing connections (which arrive on ephemeral
    ports that may lie in a guarded range), are never touched. Other ports (sshd, libvirtd's
    TLS port, migration) are not guarded unless listed.
  - The guarded ports are O(ports) plus, with O(domain_ports), every console port of the
    domains of O(libvirt_uri), the fixed ports of defined domains and the ports running domains
    have now (VNC, VNC websocket, SPICE plain and TLS), read with C(virsh dumpxml).
  - The table is made, repaired or updated in one C(nft -f -) transaction, and read back to
    check it. Its counters (C(allowed), C(refused)) and the sets of refused sources
    (C(refused_ipv4_sources), C(refused_ipv6_sources), 4096 addresses each, forgotten a day after
    their last attempt) are kept across runs; the module returns them.
  - Coexists with the remediation's table (C(virtguard_nft_table), O(remediation_table)), a
    different table with a base chain of its own, which still sees every packet this table lets
    through. The module refuses to use the remediation's table.
  - With O(rate_per_source) or O(rate_total), new connections from the allowed networks are
    rate limited too, and those over a limit are answered with a TCP reset (counter
    C(rate_limited)). A storm from inside the allowed networks then reaches QEMU, and libvirt's
    event queues, at the total rate at most.
  - With O(state=absent), deletes the table.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
attributes:
  check_mode:
    support: full
    details: Reads the table and the domains, and reports what it would change (RV(changes)).
  diff_mode:
    support: none
options:
  allowed_networks:
    description:
      - The networks (CIDR) and addresses, IPv4 and IPv6, whose new connections to the console
        ports are let through. An IPv4-mapped IPv6 network means its IPv4 form, as it is on the
        wire. Everything else is refused.
      - Required with O(state=present); it may not be empty there.
    type: list
    elements: str
  ports:
    description:
      - Console ports and ranges to guard, such as C(5900-6899); the C(console_firewall) role gives
        libvirt's display and websocket port ranges. With O(state=present), the module fails when
        neither these nor O(domain_ports) give a port to guard.
    type: list
    elements: str
    default: []
  domain_ports:
    description:
      - Also guard every console port of the domains of O(libvirt_uri), defined or running.
      - When the domains cannot be read, the table is still made with O(ports) and the ports it
        guarded before, and then the module fails with the reason.
    type: bool
    default: true
  libvirt_uri:
    description: The libvirt daemon whose domains' console ports are guarded (O(domain_ports)).
    type: str
    default: qemu:///system
  table:
    description: The nftables table (family C(inet)) of the firewall.
    type: str
    default: virtguard_console_firewall
  remediation_table:
    description:
      - The remediation's table (the rulebooks' C(virtguard_nft_table)), which this module never
        uses as its own.
    type: str
    default: virtguard
  priority:
    description:
      - The priority of the table's input chain. The default, -20, runs before the remediation's
        chain (-10), so that the firewall counts every refusal of an address outside the allowed
        networks.
    type: int
    default: -20
  rate_per_source:
    description:
      - The new console connections a second that one source of the allowed networks may open
        (an IPv4 address; an IPv6 source is its /64), with a burst of twice as many, at least 20.
        Those over it are answered with a TCP reset. V(0) sets no limit.
      - Each source's budget is its own, so a source over its limit (a blocked offender still
        trying, too) does not spend the others'. At most 65535 sources per family are
        followed (forgotten after a minute without a new connection); past that, only
        O(rate_total) applies.
    type: int
    default: 0
  rate_total:
    description:
      - The new console connections a second that all the allowed networks together may open,
        with a burst of twice as many, at least 20. Those over it are answered with a TCP reset.
        V(0) sets no limit.
      - This bounds what a storm from inside the allowed networks costs the host (QEMU's
        accepts, libvirtd's graphics events and its queues for every listener). During such a
        storm, other clients of the allowed networks may be refused too, so set it well above the
        consoles' ordinary use.
    type: int
    default: 0
  state:
    description: V(present) makes the table, V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
requirements:
  - Linux, run as root (or with C(CAP_NET_ADMIN)) on the hypervisor host.
  - C(nft) (nftables 1.0 or later), with conntrack; C(virsh) for O(domain_ports).
notes:
  - Refused attempts never reach QEMU, so libvirt raises no event for them and the rulebooks
    never see them. RV(refused_attempts) and RV(refused_sources) are the record.
"""

EXAMPLES = r"""
- name: Let only the admins' networks and the console proxy reach the consoles
  virtguard.console.console_firewall:
    allowed_networks:
      - 10.20.0.0/16
      - 2001:db8:20::/48
      - 10.30.0.5
    ports: ["5700-5899", "5900-6899"]

- name: Also keep a storm from inside those networks from reaching QEMU and libvirtd
  virtguard.console.console_firewall:
    allowed_networks: [10.20.0.0/16]
    ports: ["5700-5899", "5900-6899"]
    rate_per_source: 10
    rate_total: 200

- name: Remove the firewall's table
  virtguard.console.console_firewall:
    state: absent
"""

RETURN = r"""
table:
  description: The firewall's table.
  returned: always
  type: str
  sample: inet virtguard_console_firewall
changes:
  description: What differed from the table this run wants, in words (empty when nothing did).
  returned: when O(state=present)
  type: list
  elements: str
  sample: ["table inet virtguard_console_firewall does not exist"]
created:
  description: Whether the table did not exist before.
  returned: when O(state=present)
  type: bool
removed:
  description: Whether the table existed and was (in check mode, would be) deleted.
  returned: when O(state=absent)
  type: bool
allowed_networks:
  description: The allowed networks, collapsed per family, as the table holds them.
  returned: when O(state=present)
  type: list
  elements: str
  sample: ["10.20.0.0/16", "10.30.0.5", "2001:db8:20::/48"]
ports:
  description: The guarded ports and ranges.
  returned: when O(state=present)
  type: list
  elements: str
  sample: ["5700-6899", "7100"]
domain_ports:
  description:
    - The console ports of the domains, with the domain's name (data, as libvirt gives it),
      the graphics type, the XML attribute, and whether the port lies outside O(ports).
  returned: when O(state=present)
  type: list
  elements: dict
  sample: [{"domain": "web1", "graphics": "vnc", "attribute": "port", "port": 7100, "outside_ranges": true}]
allowed_attempts:
  description: New connections to console ports let through since the table was made (SYNs).
  returned: always
  type: int
refused_attempts:
  description: New connections to console ports refused since the table was made (SYNs answered with a reset).
  returned: always
  type: int
rate_limited_attempts:
  description:
    - New connections from the allowed networks refused over O(rate_per_source) or
      O(rate_total) (SYNs answered with a reset), since the limits were set.
  returned: always
  type: int
refused_sources:
  description:
    - The refused addresses the table remembers (those with an attempt in the last 24 hours, at
      most 4096 per family), most refusals first. C(expires_in) is the seconds
      until it is forgotten.
  returned: always
  type: list
  elements: dict
  sample: [{"address": "203.0.113.9", "packets": 3, "bytes": 180, "expires_in": 86120}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_ruleset import (
    FirewallError,
    make_spec,
    network_text,
)
from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_table import FirewallTable
from ansible_collections.virtguard.console.plugins.module_utils.domain_graphics_ports import (
    DomainReadError,
    GraphicsPort,
    read_graphics_ports,
)
from ansible_collections.virtguard.console.plugins.module_utils.host_commands import module_runner
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    AddressError,
    format_port_ranges,
    parse_port_ranges,
    port_in_ranges,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            allowed_networks=dict(type="list", elements="str"),
            ports=dict(type="list", elements="str", default=[]),
            domain_ports=dict(type="bool", default=True),
            libvirt_uri=dict(type="str", default="qemu:///system"),
            table=dict(type="str", default="virtguard_console_firewall"),
            remediation_table=dict(type="str", default="virtguard"),
            priority=dict(type="int", default=-20),
            rate_per_source=dict(type="int", default=0),
            rate_total=dict(type="int", default=0),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        required_if=[("state", "present", ["allowed_networks"])],
        supports_check_mode=True,
    )
    params = module.params
    run = module_runner(module)
    if params["table"] == params["remediation_table"]:
        module.fail_json(msg=f"table {params['table']!r} is the remediation's table (virtguard_nft_table): "
                             "the firewall needs a table of its own")
    try:
        table = FirewallTable(run, params["table"])
        if params["state"] == "absent":
            module.exit_json(table=f"inet {table.table}", **table.remove(module.check_mode))
        configured = parse_port_ranges(params["ports"])
        domain_error = None
        found: list[GraphicsPort] = []
        if params["domain_ports"]:
            try:
                found = read_graphics_ports(run, params["libvirt_uri"])
            except DomainReadError as exc:
                domain_error = str(exc)
        ranges = configured + [(p.port, p.port) for p in found]
        if domain_error is not None:
            # Keep guarding what was guarded: the fixed ports of domains that cannot be read now.
            current = table.read()
            ranges += current.elements.get("console_ports", []) if current is not None else []
        spec = make_spec(table.table, params["priority"], params["allowed_networks"], ranges,
                         params["rate_per_source"], params["rate_total"])
        result = table.apply(spec, module.check_mode)
    except (FirewallError, AddressError) as exc:
        module.fail_json(msg=str(exc))
    result.update(
        table=f"inet {spec.table}",
        allowed_networks=[network_text(n) for version in (4, 6) for n in spec.allowed[version]],
        ports=format_port_ranges(spec.ports),
        domain_ports=[dict(p._asdict(), outside_ranges=not port_in_ranges(p.port, configured)) for p in found],
    )
    if domain_error is not None:
        module.fail_json(msg=f"the console ports of the domains were not read, so the table guards only "
                             f"the configured ports and those it guarded before: {domain_error}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
