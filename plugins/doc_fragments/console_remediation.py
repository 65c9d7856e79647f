# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Options shared by the modules that act on a batch of console clients (block and cut).
    DOCUMENTATION = r"""
options:
  addresses:
    description:
      - The client addresses and networks (CIDR) of the batch, IPv4 or IPv6, for example
        C(198.51.100.7), C(2001:db8:1:2::/64), C(::10.0.0.1).
      - An IPv4-mapped IPv6 address or network (C(::ffff:192.0.2.7)) means its IPv4 form, as it
        is on the wire. An IPv4-compatible address (C(::10.0.0.1)) is an IPv6 address of its own.
      - Every item is checked with Python's C(ipaddress) before anything runs; nothing is ever
        passed through a shell.
    type: list
    elements: str
  ports:
    description:
      - Console ports (VNC, VNC websocket, SPICE) to act on besides those found by
        O(discover_ports), as port numbers or ranges such as C(5900-5999).
    type: list
    elements: str
    default: []
  discover_ports:
    description:
      - Add every TCP port on which a console process (O(console_processes)) of this host
        listens, read from C(ss -t -l -n -p). That covers libvirt's VNC ports (5900 up to 65535),
        VNC websockets (from 5700), SPICE plain and TLS ports, whatever the configuration.
    type: bool
    default: true
  console_processes:
    description:
      - Advanced. The processes whose listening ports are console ports, as shell-style
        patterns matched against the kernel's process name, which is cut to 15 characters
        (C(qemu-system-x86) for C(qemu-system-x86_64)).
    type: list
    elements: str
    default: ["qemu-system-*", "qemu-kvm"]
requirements:
  - Linux, run as root (or with C(CAP_NET_ADMIN)) on the hypervisor host.
  - C(ss) from iproute2.
"""

    # The single-address form of version 0.1.0, kept by console_block and console_cut.
    SINGLE_ADDRESS = r"""
options:
  addresses:
    description:
      - Mutually exclusive with O(address); one of them is required.
  address:
    description:
      - One client address; the form of version 0.1.0, same as O(addresses) with one item.
      - Deprecated, use O(addresses).
    type: str
"""

    # Exact connections to cut, never to block (console_cut, console_remediate).
    SESSIONS = r"""
options:
  sessions:
    description:
      - Console connections to cut exactly, and never to block, such as an offender the policy must
        not block (a trusted address, a console proxy whose clients failed the identity policy).
      - A connection is cut when its peer address is O(sessions[].address), its peer port
        O(sessions[].client_port) and its local port O(sessions[].console_port) (when given, else
        any console port). The address's other connections are kept.
      - Each item is checked before anything runs; an error names the item by its index.
      - A run may name only O(sessions), without O(addresses).
    type: list
    elements: dict
    default: []
    suboptions:
      address:
        description:
          - The client's address, IPv4 or IPv6 (an IPv4-mapped one means its IPv4 form; a zone,
            C(fe80::1%eth0), is ignored). One address, never a network.
        type: str
        required: true
      client_port:
        description: The client's own TCP port, 1 to 65535.
        type: int
        required: true
      console_port:
        description: The console port the client reached; default, any console port.
        type: int
"""
