# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Options shared by the modules that act on one console client address.
    DOCUMENTATION = r"""
options:
  address:
    description:
      - The client's IP address, IPv4 or IPv6. An IPv4-mapped IPv6 address
        (C(::ffff:192.0.2.7)) means its IPv4 address, as it does on the wire.
      - Checked with Python's C(ipaddress) before anything runs; never passed through a shell.
    type: str
    required: true
  ports:
    description:
      - The console ports (VNC, SPICE) on this host, as port numbers or ranges such as
        C(5900-5999). libvirt's automatic VNC ports start at 5900.
    type: list
    elements: str
    default: ["5900-5999"]
requirements:
  - Linux, run as root (or with C(CAP_NET_ADMIN)) on the hypervisor host.
"""
