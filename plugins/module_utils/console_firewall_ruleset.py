# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The console firewall's nftables table: what it should hold, what differs between that and
the table a host has, and the one transaction that makes it so.

The table (``inet virtguard_console_firewall`` by default; never the remediation's table)::

    table inet T {
        counter allowed {}     # new console connections let through
        counter refused {}     # new console connections answered with a TCP reset
        set console_ports { type inet_service; flags interval; }
        set allowed_ipv4 { type ipv4_addr; flags interval; }
        set allowed_ipv6 { type ipv6_addr; flags interval; }
        set refused_ipv4_sources { type ipv4_addr; size 4096; flags dynamic,timeout; timeout 1d; counter; }
        set refused_ipv6_sources { type ipv6_addr; ... }
        chain input {
            type filter hook input priority -20; policy accept;
            tcp dport @console_ports tcp flags & (fin|syn|rst|ack) == syn ct state new jump console_new
        }
        chain console_new {
            ip saddr @allowed_ipv4 counter name allowed accept
            ip6 saddr @allowed_ipv6 counter name allowed accept
            update @refused_ipv4_sources { ip saddr counter }
            update @refused_ipv6_sources { ip6 saddr counter }
            counter name refused reject with tcp reset
        }
    }

Why this shape:

* Only the first packet of a new inbound connection is judged: a SYN alone, which conntrack
  also calls ``new``. The replies to the host's own outgoing connections arrive on ephemeral
  ports that may lie in a guarded range (SYN-ACK, then ACKs), and established sessions send
  ACKs: neither is ever looked at, so a run never drops a session, and conntrack picking up a
  connection it did not see start (``new`` for a mid-stream ACK) changes nothing either.
* The reset answers the SYN itself: QEMU never accepts the connection, libvirt raises no event.
* ``accept`` ends this table's chain only: the remediation's table (its own base chain) still
  sees the packet, so an allowed network's blocked address stays blocked.
* Updating the refused-sources sets is a rule of its own: a full set ends the ``update`` rule,
  and the reset must never depend on it (a flood of spoofed SYNs fills the set).
* Priority -20 runs before the remediation's chain (-10), so every refusal of a network outside
  the allowed ones is counted here.

With a rate limit (``rate_per_source``, ``rate_total``: new connections a second, 0 for none),
the allowed networks' rules ``goto console_allowed`` instead of accepting, and that chain
refuses, with a reset and counter ``rate_limited``, what goes over the limits::

        set rate_ipv4_sources { type ipv4_addr; size 65535; flags dynamic,timeout; timeout 60s; }
        set rate_ipv6_sources { type ipv6_addr; ... }
        chain console_allowed {
            update @rate_ipv4_sources { ip saddr limit rate over R/second burst B packets } REFUSE
            update @rate_ipv6_sources { ip6 saddr & ffff:ffff:ffff:ffff:: limit rate over ... } REFUSE
            limit rate over T/second burst B packets REFUSE
            counter name allowed accept
        }

where REFUSE is ``counter name rate_limited reject with tcp reset``.

* A storm from an allowed network (an attacker with a foothold there, a runaway script) then
  reaches QEMU, and libvirt's event queues, at the total rate at most. Refused storms never
  reach QEMU at all.
* The per-source limit comes first, so that one source over its own limit (a blocked offender
  still trying, too: the remediation's table judges after this one) spends its own budget, not
  everybody's. An IPv6 source is its /64, the block one host usually has.
* A full per-source set ends the ``update`` rule, so the packet goes on to the total limit: an
  attacker with more than 65535 sources meets the total limit, never an open door.
* The burst is twice the rate, and at least 20 connections: a SPICE client opens several
  channels at once.

Each rule carries a comment with a digest of its text: the rules on the host are the role's
rules when the comments match. Set elements are compared as values (integer ranges, merged).

Pure functions, standard library only, Python 3.8+ (the module_utils run on managed hosts).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Tuple

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    AddressError,
    IPNetwork,
    format_port_ranges,
    merge_ranges,
    parse_network,
)

DEFAULT_TABLE = "virtguard_console_firewall"
DEFAULT_PRIORITY = -20
BASE_CHAIN = "input"
JUDGE_CHAIN = "console_new"
PORT_SET = "console_ports"
ALLOWED_SET = {4: "allowed_ipv4", 6: "allowed_ipv6"}
REFUSED_SOURCES_SET = {4: "refused_ipv4_sources", 6: "refused_ipv6_sources"}
LIMIT_CHAIN = "console_allowed"
RATE_SOURCES_SET = {4: "rate_ipv4_sources", 6: "rate_ipv6_sources"}
RATE_SOURCE_KEY = {4: "ip saddr", 6: "ip6 saddr & ffff:ffff:ffff:ffff::"}  # an IPv6 source is its /64
ADDRESS_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
SADDR = {4: "ip saddr", 6: "ip6 saddr"}
ALLOWED_COUNTER = "allowed"
REFUSED_COUNTER = "refused"
RATE_LIMITED_COUNTER = "rate_limited"
# The refused sources a table remembers, per family, and for how long after their last attempt.
REFUSED_SOURCES_SIZE = 4096
REFUSED_SOURCES_SECONDS = 86400
# The per-source buckets of the rate limit, per family, and how long an idle one is kept.
RATE_SOURCES_SIZE = 65535
RATE_SOURCES_SECONDS = 60
MAX_RATE = 1_000_000
MIN_BURST = 20
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")
_COMMENT_MARK = "virtguard console firewall"

Range = Tuple[int, int]


class FirewallError(Exception):
    """A firewall setting that is not valid, or nft's answer is not what it should be."""


class SetDeclaration(NamedTuple):
    """What a set is declared as: the parts of it this table cares about."""

    type: str
    interval: bool
    size: int | None
    timeout: int | None
    counter: bool


class Rule(NamedTuple):
    chain: str
    text: str
    purpose: str

    @property
    def comment(self) -> str:
        """The rule's purpose and a digest of its text: the same text, the same comment."""
        digest = hashlib.sha256(f"{self.chain}\n{self.text}".encode()).hexdigest()[:12]
        return f"{_COMMENT_MARK} {digest}: {self.purpose}"


class FirewallSpec(NamedTuple):
    """The table a host should have: its name and priority, the allowed networks (collapsed,
    per family) and the guarded ports (merged ranges)."""

    table: str
    priority: int
    allowed: dict[int, tuple[IPNetwork, ...]]
    ports: tuple[Range, ...]
    rate_per_source: int = 0  # new connections a second from one source of the allowed networks; 0: no limit
    rate_total: int = 0  # new connections a second from all the allowed networks; 0: no limit

    @property
    def limited(self) -> bool:
        return bool(self.rate_per_source or self.rate_total)

    def chains(self) -> dict[str, dict[str, Any]]:
        """The chains and their declarations (empty for a regular chain)."""
        declared: dict[str, dict[str, Any]] = {BASE_CHAIN: self.base_chain(), JUDGE_CHAIN: {}}
        if self.limited:
            declared[LIMIT_CHAIN] = {}
        return declared

    def counters(self) -> tuple[str, ...]:
        return (ALLOWED_COUNTER, REFUSED_COUNTER) + ((RATE_LIMITED_COUNTER,) if self.limited else ())

    def sets(self) -> dict[str, SetDeclaration]:
        declared = {PORT_SET: SetDeclaration("inet_service", True, None, None, False)}
        for version in (4, 6):
            declared[ALLOWED_SET[version]] = SetDeclaration(ADDRESS_TYPE[version], True, None, None, False)
            declared[REFUSED_SOURCES_SET[version]] = SetDeclaration(
                ADDRESS_TYPE[version], False, REFUSED_SOURCES_SIZE, REFUSED_SOURCES_SECONDS, True)
            if self.rate_per_source:
                declared[RATE_SOURCES_SET[version]] = SetDeclaration(
                    ADDRESS_TYPE[version], False, RATE_SOURCES_SIZE, RATE_SOURCES_SECONDS, False)
        return declared

    def elements(self) -> dict[str, list[Range]]:
        """The sets whose elements the role owns, as merged integer ranges."""
        owned = {PORT_SET: merge_ranges(self.ports)}
        for version in (4, 6):
            owned[ALLOWED_SET[version]] = merge_ranges(network_range(n) for n in self.allowed[version])
        return owned

    def rules(self) -> list[Rule]:
        rules = [Rule(BASE_CHAIN, f"tcp dport @{PORT_SET} tcp flags & (fin|syn|rst|ack) == syn ct state new "
                                  f"jump {JUDGE_CHAIN}", "new connections to a console port")]
        let_through = f"goto {LIMIT_CHAIN}" if self.limited else f"counter name {ALLOWED_COUNTER} accept"
        for version in (4, 6):
            rules.append(Rule(JUDGE_CHAIN, f"{SADDR[version]} @{ALLOWED_SET[version]} {let_through}",
                              f"allowed IPv{version} networks"))
        for version in (4, 6):
            rules.append(Rule(JUDGE_CHAIN, f"update @{REFUSED_SOURCES_SET[version]} {{ {SADDR[version]} counter }}",
                              f"remember refused IPv{version} sources"))
        rules.append(Rule(JUDGE_CHAIN, f"counter name {REFUSED_COUNTER} reject with tcp reset",
                          "refuse everything else"))
        return rules + self.limit_rules()

    def limit_rules(self) -> list[Rule]:
        """The rate limits' chain (none without a limit): each limit refuses what goes over it."""
        if not self.limited:
            return []
        refuse = f"counter name {RATE_LIMITED_COUNTER} reject with tcp reset"
        rules = []
        if self.rate_per_source:
            for version in (4, 6):
                rules.append(Rule(LIMIT_CHAIN, f"update @{RATE_SOURCES_SET[version]} {{ {RATE_SOURCE_KEY[version]} "
                                               f"{limit_text(self.rate_per_source)} }} {refuse}",
                                  f"at most {self.rate_per_source} a second from one IPv{version} source"))
        if self.rate_total:
            rules.append(Rule(LIMIT_CHAIN, f"{limit_text(self.rate_total)} {refuse}",
                              f"at most {self.rate_total} a second in all"))
        rules.append(Rule(LIMIT_CHAIN, f"counter name {ALLOWED_COUNTER} accept", "let the rest through"))
        return rules

    def base_chain(self) -> dict[str, Any]:
        return {"type": "filter", "hook": "input", "prio": self.priority, "policy": "accept"}


class TableState(NamedTuple):
    """The table as ``nft -j list table`` shows it (see console_firewall_listing)."""

    chains: dict[str, dict[str, Any]]  # name -> {type, hook, prio, policy} (empty for a regular chain)
    rule_comments: dict[str, list[str | None]]  # chain -> the comments of its rules, in order
    sets: dict[str, SetDeclaration]
    elements: dict[str, list[Range]]  # interval sets: merged integer ranges
    counters: dict[str, dict[str, int]]  # name -> {packets, bytes}
    refused_sources: list[dict[str, Any]]  # {address, packets, bytes, expires}


# -- values ---------------------------------------------------------------------------------------

def check_table_name(name: object, what: str = "table") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise FirewallError(f"{what} {name!r} must be a letter then letters, digits or _ (at most 31)")
    return name


def burst(rate: int) -> int:
    """The connections a limit lets through at once: twice its rate a second, at least MIN_BURST."""
    return max(2 * rate, MIN_BURST)


def limit_text(rate: int) -> str:
    return f"limit rate over {rate}/second burst {burst(rate)} packets"


def check_rate(rate: object, what: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int) or not 0 <= rate <= MAX_RATE:
        raise FirewallError(f"{what} must be a whole number of new connections a second from 0 (no limit) "
                            f"to {MAX_RATE}, got {rate!r}")
    return rate


def network_range(network: IPNetwork) -> Range:
    return int(network.network_address), int(network.broadcast_address)


def allowed_networks(items: Iterable[Any]) -> dict[int, tuple[IPNetwork, ...]]:
    """Addresses and CIDRs (IPv4-mapped ones as IPv4) collapsed per family; FirewallError names
    the item that does not parse."""
    ipv4: list[ipaddress.IPv4Network] = []
    ipv6: list[ipaddress.IPv6Network] = []
    for item in items:
        try:
            network = parse_network(item)
        except AddressError as exc:
            raise FirewallError(f"allowed_networks: {exc}") from None
        if isinstance(network, ipaddress.IPv4Network):
            ipv4.append(network)
        else:
            ipv6.append(network)
    return {4: tuple(ipaddress.collapse_addresses(ipv4)), 6: tuple(ipaddress.collapse_addresses(ipv6))}


def make_spec(table: str, priority: object, allowed: Iterable[Any], ports: Sequence[Range],
              rate_per_source: object = 0, rate_total: object = 0) -> FirewallSpec:
    check_table_name(table)
    per_source = check_rate(rate_per_source, "rate_per_source")
    total = check_rate(rate_total, "rate_total")
    if isinstance(priority, bool) or not isinstance(priority, int) or not -400 <= priority <= 400:
        raise FirewallError(f"priority must be a whole number from -400 to 400, got {priority!r}")
    networks = allowed_networks(allowed)
    if not networks[4] and not networks[6]:
        raise FirewallError("allowed_networks is empty: every console client would be refused "
                            "(remove the rules with state=absent instead)")
    if not ports:
        raise FirewallError("no console port to guard")
    return FirewallSpec(table, priority, networks, tuple(merge_ranges(ports)), per_source, total)


def network_text(network: IPNetwork) -> str:
    return str(network.network_address) if network.num_addresses == 1 else str(network)


# -- comparing ------------------------------------------------------------------------------------

def declaration_differences(kind: str, wanted: Mapping[str, Any], present: Mapping[str, Any]) -> list[str]:
    """What differs between the chains (or sets) the role declares and those the table has, in
    words: missing ones, ones declared otherwise, then ones that are not the role's."""
    found: list[str] = []
    for name, declaration in wanted.items():
        if name not in present:
            found.append(f"{kind} {name} is missing")
        elif present[name] != declaration:
            found.append(f"{kind} {name} is declared {present[name]}, not {declaration}")
    return found + [f"{kind} {name} is not the role's" for name in sorted(set(present) - set(wanted))]


def differences(spec: FirewallSpec, state: TableState | None) -> list[str]:
    """What differs between the table ``spec`` describes and ``state`` (None: no such table), in
    words; empty when the host's table is the role's."""
    if state is None:
        return [f"table inet {spec.table} does not exist"]
    wanted_chains = spec.chains()
    found = declaration_differences("chain", wanted_chains, state.chains)
    rules = spec.rules()
    for chain in wanted_chains:
        wanted = [rule.comment for rule in rules if rule.chain == chain]
        if chain in state.chains and state.rule_comments.get(chain, []) != wanted:
            found.append(f"the rules of chain {chain} are not the role's")
    found += declaration_differences("set", spec.sets(), state.sets)
    for name, elements in spec.elements().items():
        if name in state.sets and state.elements.get(name, []) != elements:
            found.append(f"the elements of set {name} differ")
    for name in spec.counters():
        if name not in state.counters:
            found.append(f"counter {name} is missing")
    theirs = set(state.counters) - set(spec.counters())
    found += [f"counter {name} is not the role's" for name in sorted(theirs)]
    return found


# -- writing --------------------------------------------------------------------------------------

def _declaration_text(declaration: SetDeclaration) -> str:
    parts = [f"type {declaration.type};"]
    if declaration.size is not None:
        parts.append(f"size {declaration.size};")
    if declaration.interval:
        parts.append("flags interval;")
    if declaration.timeout is not None:
        parts += ["flags dynamic,timeout;", f"timeout {declaration.timeout}s;"]
    if declaration.counter:
        parts.append("counter;")
    return " ".join(parts)


def _range_text(version: int | None, low: int, high: int) -> str:
    if version is None:
        return format_port_ranges([(low, high)])[0]
    if version == 4:
        first4, last4 = ipaddress.IPv4Address(low), ipaddress.IPv4Address(high)
        networks: list[IPNetwork] = list(ipaddress.summarize_address_range(first4, last4))
    else:
        networks = list(ipaddress.summarize_address_range(ipaddress.IPv6Address(low), ipaddress.IPv6Address(high)))
    return ", ".join(network_text(n) for n in networks)


def script(spec: FirewallSpec, state: TableState | None) -> list[str]:
    """The ``nft -f -`` lines that turn ``state`` (None: no table) into ``spec``'s table, as one
    atomic transaction. The refused-sources sets and the counters are kept when their
    declaration is right: a run does not forget who was refused, nor the counts."""
    t = f"inet {spec.table}"
    lines = [f"add table {t}"]
    chains = state.chains if state is not None else {}
    sets = state.sets if state is not None else {}
    counters = state.counters if state is not None else {}
    # Every rule goes first (nothing may reference a set or chain that is deleted below), then
    # whatever is not the role's or is declared otherwise goes.
    lines += [f"flush chain {t} {name}" for name in sorted(chains)]
    wanted_sets = spec.sets()
    wanted_chains = spec.chains()
    lines += [f"delete chain {t} {name}" for name in sorted(chains) if wanted_chains.get(name) != chains[name]]
    for name in sorted(sets):
        if wanted_sets.get(name) != sets[name]:
            lines.append(f"delete set {t} {name}")
    lines += [f"delete counter {t} {name}" for name in sorted(counters) if name not in spec.counters()]
    lines += [f"add counter {t} {name}" for name in spec.counters()]
    for name, declaration in wanted_sets.items():
        lines.append(f"add set {t} {name} {{ {_declaration_text(declaration)} }}")
    versions = {PORT_SET: None, ALLOWED_SET[4]: 4, ALLOWED_SET[6]: 6}
    for name, elements in spec.elements().items():
        lines.append(f"flush set {t} {name}")
        if elements:
            texts = ", ".join(_range_text(versions[name], low, high) for low, high in elements)
            lines.append(f"add element {t} {name} {{ {texts} }}")
    lines.append(f"add chain {t} {BASE_CHAIN} {{ type filter hook input priority {spec.priority}; policy accept; }}")
    lines += [f"add chain {t} {name}" for name in wanted_chains if name != BASE_CHAIN]
    lines += [f'add rule {t} {rule.chain} {rule.text} comment "{rule.comment}"' for rule in spec.rules()]
    return lines
