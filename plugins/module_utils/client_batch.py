# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The options of the modules that act on a batch of console clients (console_block,
console_cut, console_remediate): their argument spec, declared once as the console_remediation
doc fragment documents them once, and the batch they name.

Python 3.8+ (the module_utils run on managed hosts)."""

from __future__ import annotations

from typing import Any, Mapping

from ansible_collections.virtguard.console.plugins.module_utils.console_ports import DEFAULT_CONSOLE_PROCESSES


def batch_argument_spec() -> dict[str, Any]:
    """The options of the console_remediation doc fragment (DOCUMENTATION and SINGLE_ADDRESS),
    as a fresh argument spec; a module adds its own. O(addresses) and O(address) are exclusive,
    one of them required: the module says so (``mutually_exclusive``, ``required_one_of``)."""
    return dict(
        addresses=dict(type="list", elements="str"),
        address=dict(type="str", removed_in_version="1.0.0", removed_from_collection="virtguard.console"),
        ports=dict(type="list", elements="str", default=[]),
        discover_ports=dict(type="bool", default=True),
        console_processes=dict(type="list", elements="str", default=list(DEFAULT_CONSOLE_PROCESSES)),
    )


def batch_addresses(params: Mapping[str, Any]) -> list[Any]:
    """The batch a module acts on: O(addresses), or the one O(address) of the 0.1.0 form, or
    none (console_cut given only O(sessions))."""
    if params["addresses"] is not None:
        addresses: list[Any] = params["addresses"]
        return addresses
    return [params["address"]] if params["address"] is not None else []


def sessions_argument_spec() -> dict[str, Any]:
    """O(sessions) of console_cut and console_remediate (the console_remediation doc fragment's
    SESSIONS): exact connections to cut, never blocked. Ansible checks the shape and types;
    tcp_cut.parse_sessions the values, naming the bad item."""
    return dict(type="list", elements="dict", default=[], options=dict(
        address=dict(type="str", required=True),
        client_port=dict(type="int", required=True),
        console_port=dict(type="int"),
    ))
