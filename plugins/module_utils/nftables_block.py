# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Blocking client addresses and networks from the console ports with nftables, with a block
that expires by itself; a whole batch in one atomic transaction. This file is the table (what
runs nft); what nft prints is read by ``nftables_output``, and what a batch changes is planned
by ``nftables_plan``.

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

Planning (``nftables_plan``) keeps every set within its size: when a batch does not fit, its
elements and those already there are covered by wider networks (IPv4 /24, /16, /8; IPv6 /64,
/48, /32, /16) that overlap no protected network; only where no such network exists are the
blocks closest to expiry lifted for the batch, or the rest left out (``SetFullError`` with
the result). The kernel counts expired elements until it collects them (about every second):
if nft says full (ENFILE, "Too many open files in system") all the same, the batch is read and
planned again after a second, and in the end written without new elements for the families of
the full sets.

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
import re
import time
from typing import Any, Callable, Iterable, Sequence

from ansible_collections.virtguard.console.plugins.module_utils.host_commands import Run
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    DEFAULT_SET_SIZE,
    MAX_BLOCK_SECONDS,
    MAX_SET_SIZE,
    AddressError,
    IPNetwork,
    format_port_ranges,
    network_within,
    parse_network,
    parse_port_ranges,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_output import (
    NftablesError,
    parse_chain_names,
    parse_get_output,
    parse_set_json,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_plan import (
    MAX_PREFIX,
    MIN_PREFIX,
    BatchPlan,
    BlockSet,
    SetPlan,
    SetState,
    network_text,
)

RULE_COMMENT = "virtguard console block"
PORT_SET = "console_ports"
ADDRESS_TYPE: dict[int, str] = {4: "ipv4_addr", 6: "ipv6_addr"}
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


class SetFullError(NftablesError):
    """A block set is full: ``result`` holds what was done (``set_full`` true, ``not_blocked``)."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


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


# -- the table ----------------------------------------------------------------------------------

class BlockTable:
    """The block table on this host, driven through ``run(argv, data=None) -> (rc, out, err)``."""

    def __init__(self, run: Run, table: str = "virtguard", chain: str = "input", priority: int = -10,
                 set_size: int = DEFAULT_SET_SIZE, pause: Callable[[float], None] = time.sleep):
        self.run = run
        self.table = _check_name("table", table)
        self.chain = _check_name("chain", chain)
        if BlockSet.parse(self.chain) is not None:
            raise NftablesError(f"chain name {chain!r} is the name of a block set's chain")
        self.priority = int(priority)
        self.set_size = check_set_size(set_size)
        self.pause = pause  # waits for the kernel to collect expired elements (a set that says full)

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
              now: datetime.datetime, protected: Sequence[IPNetwork], frozen: Iterable[int]) -> BatchPlan:
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
        plan = BatchPlan(sets, self.set_size, protected)
        plan.plan(networks, timeout, refresh, now, frozen)
        return plan

    def block(self, addresses: Iterable[Any], timeout: int, ports: Iterable[Any] = (), refresh: bool = True,
              check_mode: bool = False, protected: Iterable[Any] = ()) -> dict[str, Any]:
        """Block ``addresses`` (addresses or networks) from the console ports (``ports`` added to
        those already protected) for ``timeout`` seconds; return the result. A full set makes
        room by widening, never over a ``protected`` network, then by eviction
        (nftables_plan). Raises SetFullError (with the result) when some networks found no
        room all the same."""
        try:
            ranges = parse_port_ranges(ports)
        except AddressError as exc:
            raise NftablesError(str(exc)) from None
        try:
            protected_networks = [parse_network(item) for item in protected]
        except AddressError as exc:
            raise NftablesError(f"protected_networks: {exc}") from None
        timeout = check_timeout(timeout)
        networks = parse_networks(addresses)
        versions = {n.version for n in networks}
        prefixes = {BlockSet(n.version, n.prefixlen) for n in networks}

        frozen: set[int] = set()
        attempt = 0
        while True:
            attempt += 1
            now = datetime.datetime.now(datetime.timezone.utc)
            before = self.read(versions, prefixes)
            created = not before["chains"] and before["ports"] is None
            plan = self._plan(before, networks, timeout, refresh, now, protected_networks, frozen)
            present_ports = list(before["ports"].elements) if before["ports"] is not None else []
            ports_missing = [r for r in ranges if not any(lo <= r[0] and r[1] <= hi for lo, hi in present_ports)]
            structure_changed = (not self._base_chain_ok(before["chains"].get(self.chain)) or before["ports"] is None
                                 or any(s.name not in before["chains"] for s in plan.sets))
            changed = bool(structure_changed or ports_missing or any(p.changed for p in plan.sets.values()))
            if check_mode or not changed:
                break
            rc, err = self._apply(self._script(before, plan, ranges, timeout))
            if rc == 0:
                break
            if _SET_FULL in err and not frozen:
                # The plan fit, yet nft says full: the kernel still counts elements that expired
                # and are not collected yet (it collects about every second). Wait and plan
                # again; in the end write no new element in the families of the full sets.
                if attempt < _WRITE_ATTEMPTS:
                    self.pause(1.0)
                else:
                    full = (BlockSet.parse(m.group(1)) for m in map(_FAILED_ADD.match, err.splitlines()) if m)
                    frozen = {s.version for s in full if s is not None} or set(versions)
                continue
            if _MISSING in err and attempt < _WRITE_ATTEMPTS:
                continue  # changed under us (another run): read and plan again
            raise NftablesError(f"nft -f - failed: {err.strip()}")

        result: dict[str, Any] = {
            "changed": changed,
            "table": f"inet {self.table}",
            "ruleset_created": created,
            "migrated": sorted(p.name for p in plan.sets.values() if p.migrate),
            "blocked": plan.report,
            "unchanged": plan.unchanged,
            "widened": plan.widened,
            "evicted": plan.evicted,
            "not_blocked": plan.not_blocked,
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
        result["warnings"] = self._warnings(result)
        if result["not_blocked"]:
            by_set: dict[str, list[str]] = {}
            for entry in result["not_blocked"]:
                by_set.setdefault(entry["set"], []).append(entry["network"])
            raise SetFullError("; ".join(f"{name} is full ({self.set_size} elements): {', '.join(networks)} "
                                         f"not blocked" for name, networks in sorted(by_set.items())), result)
        return result

    def _warnings(self, result: dict[str, Any]) -> list[str]:
        """What the activation log should show besides an error."""
        warnings = []
        room = []
        if result["widened"]:
            widened = sorted({entry["network"] for entry in result["widened"]})
            room.append(f"wider networks blocked instead: {', '.join(widened)}")
        if result["evicted"]:
            room.append(f"blocks lifted early: {', '.join(entry['network'] for entry in result['evicted'])}")
        if room:
            warnings.append(f"block sets of table inet {self.table} full ({self.set_size} elements each): "
                            f"{'; '.join(room)}")
        if not result["ports"]:
            warnings.append(f"table inet {self.table} protects no console port yet: the block applies "
                            f"to no port until one is added")
        return warnings

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
