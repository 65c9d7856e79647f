# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Blocking client addresses from the console ports with nftables, with a block that expires
by itself.

One table of our own (``inet virtguard`` by default) holds:

* ``console_ports``: the TCP ports to protect (an interval set, ``auto-merge``: ports only
  ever accumulate);
* ``blocked_ipv4`` / ``blocked_ipv6``: the blocked addresses (``flags timeout``: the kernel
  removes each element when its timeout runs out, nothing has to come back to unblock);
* an ``input`` chain (priority ``filter - 10``) with two rules that answer packets from a
  blocked address to a console port with a TCP reset, so a blocked client is refused at once.

Every change is one ``nft -f -`` transaction: the structure is ensured (``add`` of a table,
set or chain that exists is a no-op; the chain's rules are flushed and re-added only when they
are not exactly ours) and the elements are added in the same atomic step. ``add element`` does
not refresh the timeout of an element already in the set, so a (re)block is written as
add + delete + add of the element: atomic, valid whether or not it was there, and the
element ends up with the full timeout.

Addresses are checked with ``ipaddress`` and ports as integers before they go into the
script; names are checked against a strict pattern. Commands run as argument lists.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import json
import re

from ansible_collections.virtguard.console.plugins.module_utils.console_policy import (
    PolicyError,
    normalize_address,
    parse_port_ranges,
)

RULE_COMMENT = "virtguard console block"
SET_FOR_VERSION = {4: "blocked_ipv4", 6: "blocked_ipv6"}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")


class NftablesError(Exception):
    """nft failed or the ruleset is not what it should be."""


def _check_name(kind, name):
    if not isinstance(name, str) or not _NAME.match(name):
        raise NftablesError("%s name %r must be a letter then letters, digits or _ (at most 31)" % (kind, name))
    return name


def parse_addresses(addresses):
    """Addresses as normalised ``ipaddress`` objects (IPv4-mapped as IPv4), duplicates removed."""
    parsed = []
    for text in addresses:
        address = normalize_address(str(text))
        if address is None:
            raise NftablesError("%r is not an IP address" % (text,))
        if address not in parsed:
            parsed.append(address)
    return parsed


def _port_elements(ranges):
    return ", ".join(str(low) if low == high else "%d-%d" % (low, high) for low, high in ranges)


class BlockTable:
    """The block table on this host, driven through ``run(argv, data=None) -> (rc, out, err)``."""

    def __init__(self, run, table="virtguard", chain="input", priority=-10):
        self.run = run
        self.table = _check_name("table", table)
        self.chain = _check_name("chain", chain)
        self.priority = int(priority)

    # -- reading --------------------------------------------------------------------------
    def state(self):
        """``None`` when the table does not exist, else ``{sets: {name: elements}, rules: [comments]}``.

        Set elements are ``{value: seconds left or None}`` for address sets and a list of
        ``(first, last)`` for the port set."""
        rc, out, err = self.run(["nft", "-j", "list", "table", "inet", self.table])
        if rc != 0:
            if "No such file or directory" in err or "does not exist" in err:
                return None
            raise NftablesError("nft list table inet %s failed: %s" % (self.table, err.strip()))
        try:
            items = json.loads(out)["nftables"]
        except (ValueError, KeyError) as exc:
            raise NftablesError("cannot read nft's JSON output: %s" % exc)
        state = {"sets": {}, "rules": [], "chain": False}
        for item in items:
            if "set" in item:
                state["sets"][item["set"]["name"]] = self._elements(item["set"].get("elem", []))
            elif "chain" in item and item["chain"].get("name") == self.chain:
                state["chain"] = item["chain"].get("hook") == "input"
            elif "rule" in item and item["rule"].get("chain") == self.chain:
                state["rules"].append(item["rule"].get("comment"))
        return state

    @staticmethod
    def _elements(raw):
        elements = {}
        ports = []
        for elem in raw:
            if isinstance(elem, dict) and "elem" in elem:
                value = elem["elem"].get("val")
                elements[str(value)] = elem["elem"].get("expires")
            elif isinstance(elem, dict) and "range" in elem:
                ports.append(tuple(int(v) for v in elem["range"]))
            elif isinstance(elem, int):
                ports.append((elem, elem))
            else:
                elements[str(elem)] = None
        return ports if ports else elements

    # -- planning and applying ------------------------------------------------------------
    def _structure_ok(self, state):
        return (state is not None and state["chain"]
                and state["rules"] == [RULE_COMMENT, RULE_COMMENT]
                and all(name in state["sets"] for name in ("console_ports",) + tuple(SET_FOR_VERSION.values())))

    @staticmethod
    def _ports_covered(state, ranges):
        present = state["sets"].get("console_ports") if state else None
        present = present if isinstance(present, list) else []
        return all(any(lo <= low and high <= hi for lo, hi in present) for low, high in ranges)

    def _structure_script(self, rewrite_rules):
        t, c = self.table, self.chain
        lines = [
            "add table inet %s" % t,
            "add set inet %s console_ports { type inet_service; flags interval; auto-merge; }" % t,
            "add set inet %s blocked_ipv4 { type ipv4_addr; flags timeout; }" % t,
            "add set inet %s blocked_ipv6 { type ipv6_addr; flags timeout; }" % t,
            "add chain inet %s %s { type filter hook input priority %d; policy accept; }" % (t, c, self.priority),
        ]
        if rewrite_rules:
            lines += [
                "flush chain inet %s %s" % (t, c),
                'add rule inet %s %s ip saddr @blocked_ipv4 tcp dport @console_ports reject with tcp reset '
                'comment "%s"' % (t, c, RULE_COMMENT),
                'add rule inet %s %s ip6 saddr @blocked_ipv6 tcp dport @console_ports reject with tcp reset '
                'comment "%s"' % (t, c, RULE_COMMENT),
            ]
        return lines

    def _apply(self, lines):
        script = "\n".join(lines) + "\n"
        rc, _out, err = self.run(["nft", "-f", "-"], data=script)
        if rc != 0:
            raise NftablesError("nft -f - failed: %s" % err.strip())

    def block(self, addresses, timeout, ports, refresh=True, check_mode=False):
        """Block ``addresses`` from ``ports`` for ``timeout`` seconds; return the result."""
        try:
            ranges = parse_port_ranges(ports)
        except PolicyError as exc:
            raise NftablesError(str(exc))
        if not ranges:
            raise NftablesError("ports: give at least one console port")
        timeout = int(timeout)
        if timeout < 1:
            raise NftablesError("timeout must be at least 1 second, got %r" % (timeout,))
        parsed = parse_addresses(addresses)
        before = self.state()
        rewrite_rules = not self._structure_ok(before)
        ports_missing = not self._ports_covered(before, ranges)
        present = {}
        for name in SET_FOR_VERSION.values():
            elements = (before or {"sets": {}})["sets"].get(name)
            present.update(elements if isinstance(elements, dict) else {})
        newly = [a for a in parsed if str(a) not in present]
        refreshed = [a for a in parsed if str(a) in present and refresh]
        kept = [a for a in parsed if str(a) in present and not refresh]
        to_write = [a for a in parsed if a in newly or a in refreshed]  # in the order given
        changed = bool(rewrite_rules or ports_missing or newly or refreshed)

        if changed and not check_mode:
            lines = self._structure_script(rewrite_rules)
            lines.append("add element inet %s console_ports { %s }" % (self.table, _port_elements(ranges)))
            for address in to_write:
                name = SET_FOR_VERSION[address.version]
                element = "inet %s %s { %s" % (self.table, name, address)
                lines += ["add element %s }" % element, "delete element %s }" % element,
                          "add element %s timeout %ds }" % (element, timeout)]
            self._apply(lines)

        until = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=timeout)).isoformat()
        result = {
            "changed": changed,
            "table": "inet %s" % self.table,
            "ports": [_port_elements([r]) for r in ranges],
            "ruleset_created": before is None,
            "rules_rewritten": rewrite_rules and before is not None,
            "blocked": [{"address": str(a), "family": "ipv%d" % a.version,
                         "timeout": timeout, "until": until,
                         "already_blocked": str(a) in present} for a in to_write],
            "unchanged": [{"address": str(a), "family": "ipv%d" % a.version,
                           "expires_in": present[str(a)]} for a in kept],
        }
        if changed and not check_mode:
            self.verify_blocked(to_write)
        return result

    def verify_blocked(self, addresses):
        after = self.state()
        if not self._structure_ok(after):
            raise NftablesError("table inet %s is not complete after the update" % self.table)
        for address in addresses:
            if str(address) not in after["sets"].get(SET_FOR_VERSION[address.version], {}):
                raise NftablesError("%s is not in %s after the update" % (address, SET_FOR_VERSION[address.version]))

    def unblock(self, addresses, check_mode=False):
        """Remove addresses from the block sets before their timeout runs out."""
        parsed = parse_addresses(addresses)
        before = self.state()
        present = [a for a in parsed
                   if before and str(a) in before["sets"].get(SET_FOR_VERSION[a.version], {})]
        if present and not check_mode:
            self._apply(["delete element inet %s %s { %s }" % (self.table, SET_FOR_VERSION[a.version], a)
                         for a in present])
        return {"changed": bool(present), "table": "inet %s" % self.table,
                "unblocked": [str(a) for a in present]}

    def delete_table(self, check_mode=False):
        """Remove the whole table (every block and rule)."""
        exists = self.state() is not None
        if exists and not check_mode:
            self._apply(["delete table inet %s" % self.table])
        return {"changed": exists, "table": "inet %s" % self.table}
