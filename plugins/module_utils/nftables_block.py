# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Blocking client addresses and networks from the console ports with nftables, with a block
that expires by itself; a whole batch in one atomic transaction.

One table of our own (``inet virtguard`` by default) holds:

* ``console_ports``: the TCP ports to protect (``flags interval; auto-merge``): ports only ever
  accumulate, so a port once protected stays protected;
* block sets, all plain hash sets with ``flags timeout`` and a ``size``: ``blocked_ipv4`` and
  ``blocked_ipv6`` hold single addresses; ``blocked_ipv6_p64`` (and ``blocked_ipv4_p24``, ...,
  made when first needed) hold the network address of each blocked /64 (/24, ...) network. The
  kernel removes each element when its timeout runs out and refuses elements beyond ``size``;
* per block set, a chain of the same name with one rule that answers a packet from a blocked
  address (for a network set: the source address masked to the prefix, e.g.
  ``ip6 saddr & ffff:ffff:ffff:ffff:: @blocked_ipv6_p64``) to a console port with a TCP reset;
  the base chain ``input`` (hook input, priority ``filter - 10``) jumps to each. The chains also
  tell which block sets exist: listing chains is cheap, listing sets is not (below).

Why plain sets and not interval sets, measured with nftables 1.0.6 (Debian 12) on a set of
65000 elements: nft fetches every element of every interval set of the table for *any* command
on it (add, delete, get, even terse listings: about 1 s each), deletes from an interval set cost
about 0.1 s each in nft itself (a refresh of 200 blocked addresses took 51 s), it refuses an
interval inside another one, and mishandles overlap checks when a batch deletes and adds. On a
plain set, add and delete need no fetch (a refresh of 200: 0.03 s); only reads fetch the set.

Every run:

* reads ``nft -j list chains inet`` (cheap) and, with ``nft -j list set``, only the block sets of
  the address families in the batch: the one fetch nft would do for any lookup (``get element``
  of a missing element fails the whole call, and nft fetches everything again for the next one);
  never the whole table with its rules;
* plans the batch against them, comparing ``ipaddress`` values (nft prints ``::10.0.0.1`` where
  Python prints ``::a00:1``): an address inside a blocked network counts as blocked and the
  network's timeout is restarted;
* writes everything in one ``nft -f -`` transaction: the structure (created or repaired; the
  rules are written anew every time, so a changed chain is repaired), the ports, and each
  element as add + delete + add (``add element`` does not restart the timeout of an element
  already there on Debian 12's kernel; the first add keeps the delete valid if the element is
  new or expired since it was read), ending with the full timeout;
* verifies with one ``get element`` per set of every element it wrote (nft 1.0.6 prints text
  even with ``-j`` here), compared as ``ipaddress`` values.

A full set fails the transaction with "Too many open files in system" (ENFILE): the batch is
planned within the room left, and if nft still says full (expired elements not yet collected
count) the new elements of that set are left out and the rest is written; ``SetFullError``
carries the result with the networks not blocked.

A table of the 0.1.0 shape (``blocked_ipv4``/``blocked_ipv6`` without size, rules in ``input``)
is migrated in the same transaction that blocks: rules flushed, sets deleted and added anew with
their size, the old elements carried over with the time they had left, chains and rules added.
A set whose size differs from ``set_size`` is migrated the same way when a batch of its family
comes.

Addresses are checked with ``ipaddress``, ports and numbers as integers, names against a strict
pattern, before anything runs. Commands run as argument lists, scripts go to ``nft -f -`` on
stdin.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import socket
from typing import Any, Iterable, NamedTuple, Sequence

from ansible_collections.virtguard.console.plugins.module_utils.host_commands import Run
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    DEFAULT_SET_SIZE,
    MAX_BLOCK_SECONDS,
    MAX_SET_SIZE,
    MIN_IPV4_PREFIX,
    MIN_IPV6_PREFIX,
    AddressError,
    IPNetwork,
    format_port_ranges,
    network_within,
    parse_network,
    parse_port_ranges,
)

RULE_COMMENT = "virtguard console block"
PORT_SET = "console_ports"
HOST_SET: dict[int, str] = {4: "blocked_ipv4", 6: "blocked_ipv6"}
ADDRESS_TYPE: dict[int, str] = {4: "ipv4_addr", 6: "ipv6_addr"}
MAX_PREFIX: dict[int, int] = {4: 32, 6: 128}
# Shorter prefixes are refused: blocking 0.0.0.0/0 or ::/8 from the consoles locks everyone out.
MIN_PREFIX: dict[int, int] = {4: MIN_IPV4_PREFIX, 6: MIN_IPV6_PREFIX}
_SET_NAME = re.compile(r"^blocked_ipv(4|6)(?:_p(\d{1,3}))?$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")
_SET_FULL = "Too many open files in system"
_MISSING = "No such file or directory"
# The command line nft echoes under an error: "add element inet T SET { ... }"
_FAILED_ADD = re.compile(r"^add element inet \S+ (\S+) \{")
# Elements per `get element` call when verifying: one argument stays far below the kernel's
# 128 KiB limit for a single argument.
_GET_CHUNK = 2000
# How often a write is planned again after a concurrent change made it fail.
_WRITE_ATTEMPTS = 3


class NftablesError(Exception):
    """nft failed or the ruleset is not what it should be."""


class SetFullError(NftablesError):
    """A block set is full: ``result`` holds what was done (``set_full`` true, ``not_blocked``)."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


class BlockSet(NamedTuple):
    """A block set: the family and prefix length of its elements."""

    version: int
    prefix: int

    @property
    def name(self) -> str:
        if self.prefix == MAX_PREFIX[self.version]:
            return HOST_SET[self.version]
        return f"{HOST_SET[self.version]}_p{self.prefix}"

    @classmethod
    def parse(cls, name: str) -> BlockSet | None:
        match = _SET_NAME.match(name)
        if not match:
            return None
        version = int(match.group(1))
        prefix = int(match.group(2)) if match.group(2) else MAX_PREFIX[version]
        if not MIN_PREFIX[version] <= prefix <= MAX_PREFIX[version]:
            return None
        return cls(version, prefix)

    def match_expression(self) -> str:
        """The rule's source match: ``ip saddr`` or ``ip6 saddr & ffff:ffff:ffff:ffff::``."""
        field = "ip saddr" if self.version == 4 else "ip6 saddr"
        if self.prefix == MAX_PREFIX[self.version]:
            return field
        mask = ipaddress.ip_network(f"{'0.0.0.0' if self.version == 4 else '::'}/{self.prefix}").netmask
        return f"{field} & {mask}"

    def network(self, address: int) -> IPNetwork:
        """The network of this set's prefix that holds ``address``."""
        cls = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        return cls((address, self.prefix), strict=False)

    def key(self, address: int) -> int:
        """The element (an address as an integer) that stands for the network holding ``address``."""
        return int(self.network(address).network_address)

    def element_text(self, key: int) -> str:
        """An element as written in nft commands: a plain address (the sets are not interval sets)."""
        return str(ipaddress.IPv4Address(key) if self.version == 4 else ipaddress.IPv6Address(key))


class SetState(NamedTuple):
    """A set as nft lists it: type, flags, size (None = unbounded) and elements."""

    name: str
    type: str
    flags: tuple[str, ...]
    size: int | None
    elements: tuple[Any, ...]  # Element for address sets, (low, high) for the port set


class Element(NamedTuple):
    """An element of an address set: the address as an integer, and nft's timeouts."""

    version: int
    address: int
    timeout: int | None  # seconds; None for an element without timeout (permanent)
    expires: int | None  # seconds left; None when nft did not say


def network_text(network: IPNetwork) -> str:
    """A network as nft writes it: a single address without its /32 or /128."""
    return str(network.network_address) if network.num_addresses == 1 else str(network)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise NftablesError(f"{kind} name {name!r} must be a letter then letters, digits or _ (at most 31)")
    return name


def check_timeout(timeout: Any) -> int:
    """A block timeout in whole seconds, 1..MAX_BLOCK_SECONDS."""
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= MAX_BLOCK_SECONDS:
        raise NftablesError(f"timeout must be a whole number of seconds from 1 to {MAX_BLOCK_SECONDS} "
                            f"(nft refuses 100000000 s and more), got {timeout!r}")
    return timeout


def check_set_size(size: Any) -> int:
    """A set size, 1..MAX_SET_SIZE (0 would mean unbounded; more than MAX_SET_SIZE is stored wrong)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SET_SIZE:
        raise NftablesError(f"set_size must be a whole number from 1 to {MAX_SET_SIZE}, got {size!r}")
    return size


def parse_networks(addresses: Iterable[Any]) -> list[IPNetwork]:
    """Addresses and CIDR networks as network values (IPv4-mapped as IPv4), without duplicates,
    widest first (so a network is planned before the addresses of the batch inside it); too
    short prefixes refused."""
    parsed = []
    for text in addresses:
        try:
            network = parse_network(text)
        except AddressError as exc:
            raise NftablesError(f"addresses: {exc}") from None
        if network.prefixlen < MIN_PREFIX[network.version]:
            raise NftablesError(f"addresses: {text!r} is wider than /{MIN_PREFIX[network.version]}: "
                                f"blocking it would lock out far too many clients")
        if network not in parsed:
            parsed.append(network)
    return sorted(parsed, key=lambda n: n.prefixlen)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Port ranges sorted, overlapping and adjacent ones merged."""
    return parse_port_ranges(format_port_ranges(ranges))


# -- reading nft's output ---------------------------------------------------------------------

def _address_of(text: str) -> tuple[int, int]:
    """``(version, address as int)`` of an address as nft prints it (``::10.0.0.1`` and
    ``::a00:1`` are the same value). inet_pton is strict and ten times faster than ipaddress,
    which counts with 65536 elements per set."""
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        try:
            return version, int.from_bytes(socket.inet_pton(family, text), "big")
        except (OSError, ValueError):
            continue
    raise ValueError(f"{text!r} is not an IP address")


def parse_address_elements(raw: Iterable[Any]) -> list[Element]:
    """The ``elem`` list of an address set in nft's JSON: ``"10.0.0.2"`` (no timeout) or
    ``{"elem": {"val": "10.0.0.1", "timeout": 600, "expires": 599}}``."""
    elements = []
    for item in raw:
        timeout = expires = None
        if isinstance(item, dict) and "elem" in item:
            timeout = item["elem"].get("timeout")
            expires = item["elem"].get("expires")
            item = item["elem"]["val"]
        if not isinstance(item, str):
            raise ValueError(f"unexpected element {item!r} in an address set")
        version, address = _address_of(item)
        elements.append(Element(version, address, timeout, expires))
    return elements


def parse_port_elements(raw: Iterable[Any]) -> list[tuple[int, int]]:
    """The ``elem`` list of the port set in nft's JSON: ``5900`` or ``{"range": [5900, 5999]}``."""
    ports = []
    for item in raw:
        if isinstance(item, dict) and "elem" in item:
            item = item["elem"]["val"]
        if isinstance(item, dict) and "range" in item:
            ports.append((int(item["range"][0]), int(item["range"][1])))
        else:
            ports.append((int(item), int(item)))
    return sorted(ports)


def parse_set_json(output: str) -> SetState:
    """The one set of ``nft -j list set inet T NAME``."""
    try:
        raw = [item["set"] for item in json.loads(output)["nftables"] if "set" in item][0]
        name, kind = raw["name"], raw["type"]
        elements: list[Any] = (parse_port_elements(raw.get("elem", [])) if kind == "inet_service"
                               else parse_address_elements(raw.get("elem", [])))
        flags = raw.get("flags", [])
        flags = tuple(sorted([flags] if isinstance(flags, str) else flags))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise NftablesError(f"cannot read nft's JSON listing of a set: {exc!r}") from None
    return SetState(name, kind, flags, raw.get("size"), tuple(elements))


def parse_chain_names(output: str, table: str) -> list[dict[str, Any]]:
    """The chains of ``table`` in ``nft -j list chains inet``."""
    try:
        items = json.loads(output)["nftables"]
    except (ValueError, KeyError) as exc:
        raise NftablesError(f"cannot read nft's JSON listing of chains: {exc!r}") from None
    return [item["chain"] for item in items if "chain" in item and item["chain"].get("table") == table]


def parse_get_output(output: str) -> dict[str, set[tuple[int, int]]]:
    """The elements nft 1.0.6 prints (as text, even with ``-j``) for ``get element`` commands,
    by set: ``set blocked_ipv4 { ... elements = { 10.0.0.2, 10.0.0.1 timeout 9m50s expires
    9m49s952ms } }`` -> ``{"blocked_ipv4": {(4, 167772162), (4, 167772161)}}``."""
    found: dict[str, set[tuple[int, int]]] = {}
    for name, block in re.findall(r"set (\S+) \{[^{}]*?elements = \{([^}]*)\}", output):
        values = found.setdefault(name, set())
        for item in block.split(","):
            words = item.split()
            if words:
                try:
                    values.add(_address_of(words[0]))
                except ValueError:
                    raise NftablesError(f"cannot read element {words[0]!r} in nft's output") from None
    return found


def _until(seconds: int | None, now: datetime.datetime) -> str | None:
    return None if seconds is None else (now + datetime.timedelta(seconds=seconds)).isoformat()


# -- planning -----------------------------------------------------------------------------------

class SetPlan:
    """What one batch does to one block set."""

    def __init__(self, block_set: BlockSet, state: SetState | None, size: int):
        self.block_set = block_set
        self.name = block_set.name
        self.state = state
        self.size = size
        self.exists = state is not None
        self.migrate = state is not None and (state.flags != ("timeout",) or state.size != size)
        self.present: dict[int, Element] = {e.address: e for e in (state.elements if state else ())}
        self.new: list[int] = []
        self.refreshed: list[int] = []
        self.not_blocked: list[int] = []
        self.carried: list[Element] = []  # migration: old elements written again

    @property
    def changed(self) -> bool:
        return bool(self.new or self.refreshed or self.migrate or not self.exists)

    def has_room(self) -> bool:
        """Whether one more element fits. A migrated set is made anew: the batch comes first,
        old elements fill the room it leaves."""
        used = len(self.new) + (len(self.refreshed) if self.migrate else len(self.present))
        return used + 1 <= self.size

    def text(self, address: int) -> str:
        return network_text(self.block_set.network(address))

    def carry_over(self) -> None:
        """Old elements carried over with the time they had left, longest first, in the room
        the batch leaves."""
        if not self.migrate:
            return
        keep = [e for address, e in self.present.items() if address not in self.refreshed]
        keep.sort(key=lambda e: (e.timeout is not None, -(e.expires or 0)))
        self.carried = keep[:max(self.size - len(self.new) - len(self.refreshed), 0)]

    def lines(self, table: str, timeout: int) -> list[str]:
        """The element commands of this plan (after the set exists)."""
        prefix = f"inet {table} {self.name}"
        lines = []
        if self.migrate:  # a fresh set: plain adds
            for element in self.carried:
                left = "" if element.timeout is None else f" timeout {max(1, element.expires or 1)}s"
                lines.append(f"add element {prefix} {{ {self.block_set.element_text(element.address)}{left} }}")
            for address in self.refreshed + self.new:
                lines.append(f"add element {prefix} {{ {self.block_set.element_text(address)} timeout {timeout}s }}")
            return lines
        for address in self.refreshed + self.new:
            text = self.block_set.element_text(address)
            lines += [f"add element {prefix} {{ {text} }}", f"delete element {prefix} {{ {text} }}",
                      f"add element {prefix} {{ {text} timeout {timeout}s }}"]
        return lines

    def written(self) -> list[int]:
        return self.refreshed + self.new


class BatchPlan:
    """The plan of one batch over every block set involved."""

    def __init__(self, sets: dict[BlockSet, SetPlan]):
        self.sets = sets
        self.report: list[dict[str, Any]] = []
        self.unchanged: list[dict[str, Any]] = []

    def plan(self, networks: Sequence[IPNetwork], timeout: int, refresh: bool, now: datetime.datetime) -> None:
        until = _until(timeout, now)
        for network in networks:
            version = network.version
            holder = None
            # The widest blocked network holding it wins (it blocks the most).
            for block_set in sorted((s for s in self.sets if s.version == version), key=lambda s: s.prefix):
                if block_set.prefix > network.prefixlen:
                    continue
                plan = self.sets[block_set]
                key = block_set.key(int(network.network_address))
                if key in plan.present or key in plan.new:
                    holder = (plan, key)
                    break
            entry: dict[str, Any] = {"requested": network_text(network), "family": f"ipv{version}"}
            if holder is not None:
                plan, key = holder
                entry.update(network=plan.text(key), set=plan.name, already_blocked=key in plan.present)
                if key not in plan.present:  # inside a network this batch blocks
                    self.report.append(dict(entry, timeout=timeout, until=until))
                    continue
                element = plan.present[key]
                if element.timeout is None:  # permanent: nothing to refresh
                    self.unchanged.append(dict(entry, expires_in=None))
                    self.report.append(dict(entry, timeout=None, until=None))
                elif refresh:
                    if key not in plan.refreshed:
                        plan.refreshed.append(key)
                    self.report.append(dict(entry, timeout=timeout, until=until))
                else:
                    self.unchanged.append(dict(entry, expires_in=element.expires))
                    self.report.append(dict(entry, timeout=element.timeout, until=_until(element.expires, now)))
                continue
            plan = self.sets[BlockSet(version, network.prefixlen)]
            key = int(network.network_address)
            if not plan.has_room():
                plan.not_blocked.append(key)
                continue
            plan.new.append(key)
            self.report.append(dict(entry, network=plan.text(key), set=plan.name, already_blocked=False,
                                    timeout=timeout, until=until))
        for plan in self.sets.values():
            plan.carry_over()

    def drop_new(self, names: set[str]) -> None:
        """Leave out the new elements of the sets ``names`` (full after all)."""
        dropped: set[tuple[str, str]] = set()
        for plan in self.sets.values():
            if plan.name in names:
                plan.not_blocked.extend(plan.new)
                dropped.update((plan.name, plan.text(a)) for a in plan.new)
                plan.new = []
        self.report = [e for e in self.report if (e["set"], e["network"]) not in dropped]

    def not_blocked(self) -> list[dict[str, str]]:
        return [{"network": plan.text(a), "set": plan.name} for plan in self.sets.values() for a in plan.not_blocked]


# -- the table ----------------------------------------------------------------------------------

class BlockTable:
    """The block table on this host, driven through ``run(argv, data=None) -> (rc, out, err)``."""

    def __init__(self, run: Run, table: str = "virtguard", chain: str = "input", priority: int = -10,
                 set_size: int = DEFAULT_SET_SIZE):
        self.run = run
        self.table = _check_name("table", table)
        self.chain = _check_name("chain", chain)
        if _SET_NAME.match(self.chain):
            raise NftablesError(f"chain name {chain!r} is the name of a block set's chain")
        self.priority = int(priority)
        self.set_size = check_set_size(set_size)

    # -- reading --------------------------------------------------------------------------------
    def read_set(self, name: str) -> SetState | None:
        """The set ``name`` of our table with its elements, or None when it (or the table) does
        not exist."""
        rc, out, err = self.run(["nft", "-j", "list", "set", "inet", self.table, name])
        if rc != 0:
            if _MISSING in err:
                return None
            raise NftablesError(f"nft list set inet {self.table} {name} failed: {err.strip()}")
        return parse_set_json(out)

    def read_chains(self) -> dict[str, dict[str, Any]]:
        """Our table's chains by name (declarations only: listing rules would make nft fetch
        every set element)."""
        rc, out, err = self.run(["nft", "-j", "list", "chains", "inet"])
        if rc != 0:
            raise NftablesError(f"nft list chains inet failed: {err.strip()}")
        return {chain["name"]: chain for chain in parse_chain_names(out, self.table)}

    def _base_chain_ok(self, chain: dict[str, Any] | None) -> bool:
        if not chain:
            return False
        return (chain.get("type"), chain.get("hook"), chain.get("prio"), chain.get("policy")) == (
            "filter", "input", self.priority, "accept")

    def read(self, versions: Iterable[int], prefixes: Iterable[BlockSet] = ()) -> dict[str, Any]:
        """Chains, the port set, and the block sets of ``versions`` (those that exist, plus the
        host sets and ``prefixes``)."""
        chains = self.read_chains()
        existing = {s for s in map(BlockSet.parse, chains) if s is not None}
        # A 0.1.0 table has the host sets (no size) but no chains for them: read them to migrate.
        old_shape = bool(chains) and not existing
        wanted = set(prefixes) | {BlockSet(v, MAX_PREFIX[v]) for v in versions}
        wanted |= {s for s in existing if s.version in versions}
        if old_shape:
            wanted |= {BlockSet(v, MAX_PREFIX[v]) for v in (4, 6)}
        states = {s: self.read_set(s.name) for s in sorted(wanted)}
        return {"chains": chains, "existing": existing, "states": states, "ports": self.read_set(PORT_SET)}

    # -- writing --------------------------------------------------------------------------------
    def _apply(self, lines: list[str]) -> tuple[int, str]:
        rc, _out, err = self.run(["nft", "-f", "-"], data="\n".join(lines) + "\n")
        return rc, err

    def _script(self, before: dict[str, Any], plan: BatchPlan, ranges: list[tuple[int, int]],
                timeout: int) -> list[str]:
        t, base = self.table, self.chain
        lines = [f"add table inet {t}",
                 f"add set inet {t} {PORT_SET} {{ type inet_service; flags interval; auto-merge; }}"]
        if base in before["chains"] and not self._base_chain_ok(before["chains"][base]):
            lines += [f"flush chain inet {t} {base}", f"delete chain inet {t} {base}"]
        # Every rule is written anew (atomically, with the rest): listing rules would make nft
        # fetch every set element, and this repairs a changed chain.
        lines += [f"add chain inet {t} {base} {{ type filter hook input priority {self.priority}; policy accept; }}",
                  f"flush chain inet {t} {base}"]
        all_sets = sorted(before["existing"] | set(plan.sets))
        for block_set in all_sets:
            lines += [f"add chain inet {t} {block_set.name}", f"flush chain inet {t} {block_set.name}"]
        for block_set, set_plan in sorted(plan.sets.items()):
            declaration = (f"add set inet {t} {set_plan.name} {{ type {ADDRESS_TYPE[block_set.version]}; "
                           f"flags timeout; size {self.set_size}; }}")
            if set_plan.migrate:
                lines += [f"delete set inet {t} {set_plan.name}", declaration]
            elif not set_plan.exists:
                lines.append(declaration)
        if ranges:
            lines.append(f"add element inet {t} {PORT_SET} {{ {', '.join(format_port_ranges(ranges))} }}")
        for set_plan in plan.sets.values():
            lines += set_plan.lines(t, timeout)
        for block_set in all_sets:
            lines += [f"add rule inet {t} {base} jump {block_set.name}",
                      f"add rule inet {t} {block_set.name} {block_set.match_expression()} @{block_set.name} "
                      f'tcp dport @{PORT_SET} reject with tcp reset comment "{RULE_COMMENT}"']
        return lines

    def _plan(self, before: dict[str, Any], networks: Sequence[IPNetwork], timeout: int, refresh: bool,
              now: datetime.datetime) -> BatchPlan:
        sets: dict[BlockSet, SetPlan] = {}
        needed = {BlockSet(n.version, n.prefixlen) for n in networks}
        for block_set, state in before["states"].items():
            if state is not None and state.type != ADDRESS_TYPE[block_set.version]:
                raise NftablesError(f"set {state.name} of table inet {self.table} has type {state.type}, "
                                    f"not {ADDRESS_TYPE[block_set.version]}")
            if state is not None or block_set in needed or block_set in before["existing"]:
                sets[block_set] = SetPlan(block_set, state, self.set_size)
        for block_set in needed - set(sets):
            sets[block_set] = SetPlan(block_set, None, self.set_size)
        plan = BatchPlan(sets)
        plan.plan(networks, timeout, refresh, now)
        return plan

    def block(self, addresses: Iterable[Any], timeout: int, ports: Iterable[Any] = (), refresh: bool = True,
              check_mode: bool = False) -> dict[str, Any]:
        """Block ``addresses`` (addresses or networks) from the console ports (``ports`` added to
        those already protected) for ``timeout`` seconds; return the result. Raises SetFullError
        (with the result) when some networks found no room."""
        try:
            ranges = parse_port_ranges(ports)
        except AddressError as exc:
            raise NftablesError(str(exc)) from None
        timeout = check_timeout(timeout)
        networks = parse_networks(addresses)
        versions = {n.version for n in networks}
        prefixes = {BlockSet(n.version, n.prefixlen) for n in networks}

        for attempt in range(_WRITE_ATTEMPTS):
            now = datetime.datetime.now(datetime.timezone.utc)
            before = self.read(versions, prefixes)
            created = not before["chains"] and before["ports"] is None
            plan = self._plan(before, networks, timeout, refresh, now)
            present_ports = list(before["ports"].elements) if before["ports"] is not None else []
            ports_missing = [r for r in ranges if not any(lo <= r[0] and r[1] <= hi for lo, hi in present_ports)]
            structure_changed = (not self._base_chain_ok(before["chains"].get(self.chain)) or before["ports"] is None
                                 or any(s.name not in before["chains"] for s in plan.sets))
            changed = bool(structure_changed or ports_missing or any(p.changed for p in plan.sets.values()))
            if check_mode or not changed:
                break
            rc, err = self._apply(self._script(before, plan, ranges, timeout))
            if rc != 0 and _SET_FULL in err:
                full = {m.group(1) for m in map(_FAILED_ADD.match, err.splitlines()) if m}
                plan.drop_new(full or {p.name for p in plan.sets.values()})
                rc, err = self._apply(self._script(before, plan, ranges, timeout))
            if rc == 0:
                break
            if _MISSING in err and attempt + 1 < _WRITE_ATTEMPTS:
                continue  # changed under us (another run): read and plan again
            raise NftablesError(f"nft -f - failed: {err.strip()}")

        result: dict[str, Any] = {
            "changed": changed,
            "table": f"inet {self.table}",
            "ruleset_created": created,
            "migrated": sorted(p.name for p in plan.sets.values() if p.migrate),
            "blocked": plan.report,
            "unchanged": plan.unchanged,
            "not_blocked": plan.not_blocked(),
            "set_size": self.set_size,
            "verified": changed and not check_mode,
        }
        result["set_full"] = bool(result["not_blocked"])
        if changed and not check_mode:
            self.verify_blocked(plan)
            after = self.read_set(PORT_SET)
            result["ports"] = format_port_ranges(after.elements if after is not None else [])
        else:
            result["ports"] = format_port_ranges(merge_ranges(present_ports + ranges))
        if result["not_blocked"]:
            by_set: dict[str, list[str]] = {}
            for entry in result["not_blocked"]:
                by_set.setdefault(entry["set"], []).append(entry["network"])
            raise SetFullError("; ".join(f"{name} is full ({self.set_size} elements): {', '.join(networks)} "
                                         f"not blocked" for name, networks in sorted(by_set.items())), result)
        if not result["ports"]:
            result["warnings"] = [f"table inet {self.table} protects no console port yet: the block applies "
                                  f"to no port until one is added"]
        return result

    def verify_blocked(self, plan: BatchPlan) -> None:
        """Every element the plan wrote is in its set: ``get element`` commands for all sets in
        one ``nft -f -`` (nft fetches the table's elements once for all of them), compared as
        integers (nft's text and Python's differ for the same address)."""
        wanted = {p.name: p for p in plan.sets.values() if p.written()}
        if not wanted:
            return
        lines = []
        for set_plan in wanted.values():
            written = set_plan.written()
            for start in range(0, len(written), _GET_CHUNK):
                elements = ", ".join(set_plan.block_set.element_text(a) for a in written[start:start + _GET_CHUNK])
                lines.append(f"get element inet {self.table} {set_plan.name} {{ {elements} }}")
        rc, out, err = self.run(["nft", "-f", "-"], data="\n".join(lines) + "\n")
        found = parse_get_output(out) if rc == 0 else {}
        for name, set_plan in wanted.items():
            present = {address for _version, address in found.get(name, ())}
            missing = [a for a in set_plan.written() if a not in present]
            if missing:
                # nft stops at the first element it does not find: which ones exactly comes from
                # one listing of this set, on this error path only.
                state = self.read_set(name)
                listed = {e.address for e in state.elements} if state is not None else set()
                missing = [a for a in missing if a not in listed]
            if missing:
                raise NftablesError(f"{', '.join(set_plan.text(a) for a in missing)} not in {name} after the "
                                    f"update{': ' + err.strip() if rc != 0 else ''}")

    def unblock(self, addresses: Iterable[Any], check_mode: bool = False) -> dict[str, Any]:
        """Remove the elements equal to or inside the given networks before their timeout. A
        network inside a wider blocked one is not unblocked (that would unblock others): it is
        reported in ``still_blocked``."""
        networks = parse_networks(addresses)
        chains = self.read_chains()
        existing = sorted({s for s in map(BlockSet.parse, chains) if s is not None}
                          | {BlockSet(v, MAX_PREFIX[v]) for v in (4, 6)})
        lines: list[str] = []
        unblocked: list[str] = []
        still: list[dict[str, str]] = []
        for block_set in existing:
            family = [n for n in networks if n.version == block_set.version]
            if not family:
                continue
            state = self.read_set(block_set.name)
            for element in state.elements if state is not None else ():
                held = block_set.network(element.address)
                text = network_text(held)
                if any(network_within(held, n) for n in family):
                    unblocked.append(text)
                    prefix = f"inet {self.table} {block_set.name}"
                    item = block_set.element_text(element.address)
                    lines += [f"add element {prefix} {{ {item} }}", f"delete element {prefix} {{ {item} }}"]
                else:
                    still += [{"network": network_text(n), "blocked_by": text} for n in family
                              if network_within(n, held)]
        if lines and not check_mode:
            rc, err = self._apply(lines)
            if rc != 0:
                raise NftablesError(f"nft -f - failed: {err.strip()}")
        return {"changed": bool(lines), "table": f"inet {self.table}", "unblocked": unblocked,
                "still_blocked": still}
