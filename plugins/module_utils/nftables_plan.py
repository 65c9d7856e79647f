# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planning a batch of blocks against the block sets as nft listed them: which element holds
each address or network of the batch, and what happens when a set would hold more than its
size. Pure logic, no nft here: ``nftables_block`` reads the sets, writes the plan and verifies.

Each block set holds the network addresses of one prefix length (``blocked_ipv4`` /32,
``blocked_ipv4_p24`` /24, ...), at most ``size`` of them. A batch is planned in three steps:

1. **Hold.** Each item (widest first) is held by the widest element that already covers it
   (its timeout is restarted when ``refresh``), or becomes a new element of its own set.
2. **Fit.** Each set over its size, from the longest prefix to the shortest, makes room:

   * *widen*: its elements are grouped by the next prefix of ``WIDENING_PREFIXES`` (IPv4 /24,
     /16, /8; IPv6 /64, /48, /32, /16), and the wider network of the largest group replaces
     that group's elements (new or already blocked), then the next largest, until the set fits.
     A wider network goes to the set of its prefix, whose turn comes next. Never used: a wider
     network that overlaps a protected network, or an IPv6 range whose clients are blocked by
     address alone (IPv4-embedding ranges). Elements without timeout (put there by hand) stay;
   * *evict*, when widening cannot make room: the blocks closest to their expiry that hold
     nothing of the batch are lifted, as many as the batch needs;
   * *leave out*, when nothing else helps: the new elements that hold the fewest items of the
     batch are not written.

3. **Report** what holds each item (``report``, ``unchanged``), what was ``widened``,
   ``evicted`` or ``not_blocked``.

Eviction alone would let the evicted offender straight back in (it reconnects and evicts the
next one): that is why widening comes first and eviction only where widening would cover a
protected network.

Python 3.8+, standard library only (module_utils run on managed hosts).
"""

from __future__ import annotations

import bisect
import datetime
import ipaddress
import re
from typing import Any, Iterable, NamedTuple, Sequence

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    MIN_IPV4_PREFIX,
    MIN_IPV6_PREFIX,
    IPNetwork,
    per_address_only,
)

HOST_SET: dict[int, str] = {4: "blocked_ipv4", 6: "blocked_ipv6"}
MAX_PREFIX: dict[int, int] = {4: 32, 6: 128}
# Shorter prefixes are refused: blocking 0.0.0.0/0 or ::/8 from the consoles locks everyone out.
MIN_PREFIX: dict[int, int] = {4: MIN_IPV4_PREFIX, 6: MIN_IPV6_PREFIX}
# The prefixes a full set widens to, narrowest first: IPv4 /24, /16, /8; IPv6 /64 (a site's
# subnet), /48 (a site), /32 (a provider's allocation), /16.
WIDENING_PREFIXES: dict[int, tuple[int, ...]] = {
    4: tuple(range(24, MIN_IPV4_PREFIX - 1, -8)),
    6: (64,) + tuple(range(48, MIN_IPV6_PREFIX - 1, -16)),
}
_SET_NAME = re.compile(r"^blocked_ipv(4|6)(?:_p(\d{1,3}))?$")


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


def wider_prefix(version: int, prefix: int) -> int | None:
    """The prefix a full set of ``prefix`` widens its elements to, or None past the widest."""
    for step in WIDENING_PREFIXES[version]:
        if step < prefix:
            return step
    return None


def until(seconds: int | None, now: datetime.datetime) -> str | None:
    """When a block of ``seconds`` from ``now`` ends (ISO 8601), None for no timeout."""
    return None if seconds is None else (now + datetime.timedelta(seconds=seconds)).isoformat()


def _address_ranges(networks: Iterable[IPNetwork]) -> dict[int, tuple[list[int], list[int]]]:
    """Per IP version, the first and last addresses (as integers) of ``networks``, merged into
    disjoint ranges in order: ``{4: ([first, ...], [last, ...]), 6: ...}``."""
    ranges: dict[int, tuple[list[int], list[int]]] = {4: ([], []), 6: ([], [])}
    ordered = sorted((n.version, int(n.network_address), int(n.broadcast_address)) for n in networks)
    for version, first, last in ordered:
        starts, ends = ranges[version]
        if ends and first <= ends[-1] + 1:
            ends[-1] = max(ends[-1], last)
        else:
            starts.append(first)
            ends.append(last)
    return ranges


class SetPlan:
    """What one batch does to one block set. Keys are elements: network addresses as integers."""

    def __init__(self, block_set: BlockSet, state: SetState | None, size: int):
        self.block_set = block_set
        self.name = block_set.name
        self.size = size
        self.exists = state is not None
        # a set of another shape or size is made anew: its old elements are carried over
        self.migrate = state is not None and (state.flags != ("timeout",) or state.size != size)
        self.present: dict[int, Element] = {e.address: e for e in (state.elements if state else ())}
        # dicts as ordered sets: batches of thousands are looked up element by element
        self.new: dict[int, None] = {}
        self.refreshed: dict[int, None] = {}
        self.held: set[int] = set()  # present elements that hold something of the batch: never evicted
        self.removed: set[int] = set()  # present elements taken out (a wider network holds them, or evicted)

    def holds(self, key: int) -> bool:
        return key in self.new or (key in self.present and key not in self.removed)

    def count(self) -> int:
        """Elements in the set once the plan is written."""
        return len(self.present) - len(self.removed) + len(self.new)

    def movable(self) -> list[int]:
        """The elements a wider network may take over: all but those without timeout."""
        kept = [key for key, element in self.present.items()
                if key not in self.removed and element.timeout is not None]
        return kept + list(self.new)

    def take(self, key: int) -> None:
        """Take element ``key`` out of the set."""
        if key in self.new:
            del self.new[key]
        else:
            self.removed.add(key)
            self.refreshed.pop(key, None)

    @property
    def changed(self) -> bool:
        return bool(self.new or self.refreshed or self.removed or self.migrate or not self.exists)

    def text(self, key: int) -> str:
        return network_text(self.block_set.network(key))

    def lines(self, table: str, timeout: int) -> list[str]:
        """The element commands of this plan (after the set exists)."""
        prefix = f"inet {table} {self.name}"
        element_text = self.block_set.element_text
        lines = []
        if self.migrate:  # a fresh set: plain adds, old elements with the time they had left
            for key, element in self.present.items():
                if key not in self.removed and key not in self.refreshed:
                    left = "" if element.timeout is None else f" timeout {max(1, element.expires or 1)}s"
                    lines.append(f"add element {prefix} {{ {element_text(key)}{left} }}")
            for key in self.written():
                lines.append(f"add element {prefix} {{ {element_text(key)} timeout {timeout}s }}")
            return lines
        # deletions first: the kernel gives their room to the adds of the same transaction;
        # the add keeps the delete valid if the element expired since it was read
        for key in sorted(self.removed):
            text = element_text(key)
            lines += [f"add element {prefix} {{ {text} }}", f"delete element {prefix} {{ {text} }}"]
        # add + delete + add: `add element` alone does not restart the timeout of an element
        # already there (Debian 12's kernel)
        for key in self.written():
            text = element_text(key)
            lines += [f"add element {prefix} {{ {text} }}", f"delete element {prefix} {{ {text} }}",
                      f"add element {prefix} {{ {text} timeout {timeout}s }}"]
        return lines

    def written(self) -> list[int]:
        return list(self.refreshed) + list(self.new)


class BatchPlan:
    """The plan of one batch over every block set involved (module docstring)."""

    def __init__(self, sets: dict[BlockSet, SetPlan], size: int, protected: Iterable[IPNetwork] = ()):
        self.sets = sets
        self.size = size
        self.protected = _address_ranges(protected)
        self.requests: list[IPNetwork] = []
        self.report: list[dict[str, Any]] = []
        self.unchanged: list[dict[str, Any]] = []
        self.not_blocked: list[dict[str, str]] = []
        self.evicted: list[dict[str, Any]] = []
        # (set, key) of a wider element -> what it covers, and the present elements it took over
        # (lifted if it is left out after all)
        self._widened: dict[tuple[BlockSet, int], list[IPNetwork]] = {}
        self._took: dict[tuple[BlockSet, int], list[tuple[SetPlan, int]]] = {}

    @property
    def widened(self) -> list[dict[str, Any]]:
        """Each wider network blocked instead of narrower elements: ``{network, set, covers}``,
        ``covers`` being the elements of the batch and the blocks it replaces."""
        return [{"network": self.sets[block_set].text(key), "set": block_set.name,
                 "covers": [network_text(n) for n in sorted(covers, key=lambda n: (n.network_address, n.prefixlen))]}
                for (block_set, key), covers in self._widened.items()]

    def set_plan(self, block_set: BlockSet) -> SetPlan:
        if block_set not in self.sets:
            self.sets[block_set] = SetPlan(block_set, None, self.size)
        return self.sets[block_set]

    def holder(self, network: IPNetwork) -> tuple[SetPlan, int] | None:
        """The widest element (present and kept, or new) that covers ``network``."""
        for block_set in sorted(s for s in self.sets if s.version == network.version):
            if block_set.prefix > network.prefixlen:
                break
            key = block_set.key(int(network.network_address))
            if self.sets[block_set].holds(key):
                return self.sets[block_set], key
        return None

    def plan(self, networks: Sequence[IPNetwork], timeout: int, refresh: bool, now: datetime.datetime,
             frozen: Iterable[int] = ()) -> None:
        """Plan ``networks`` (widest first); the families in ``frozen`` get no new element
        (nft said full although the plan fit)."""
        self.requests = list(networks)
        frozen = set(frozen)
        for network in networks:
            holder = self.holder(network)
            if holder is not None:
                plan, key = holder
                if key in plan.present:
                    plan.held.add(key)
                    if refresh and plan.present[key].timeout is not None:
                        plan.refreshed[key] = None
            elif network.version not in frozen:
                self.set_plan(BlockSet(network.version, network.prefixlen)).new[int(network.network_address)] = None
        for version in sorted({s.version for s in self.sets}):
            self._fit(version)
        self._report(timeout, now)

    # -- fitting within the size ----------------------------------------------------------------
    def _fit(self, version: int) -> None:
        """Each set of ``version``, the longest prefix first: widening fills shorter ones."""
        done: set[int] = set()
        while True:
            pending = [s for s in self.sets if s.version == version and s.prefix not in done]
            if not pending:
                return
            block_set = max(pending, key=lambda s: s.prefix)
            done.add(block_set.prefix)
            plan = self.sets[block_set]
            over = plan.count() - self.size
            if over > 0:
                over -= self._widen(plan, over)
            if over > 0:
                over -= self._evict(plan, over)
            if over > 0:
                self._leave_out(plan, over)

    def _may_block(self, network: IPNetwork) -> bool:
        """Whether a network may be blocked wider than asked."""
        if per_address_only(network):
            return False
        low, high = int(network.network_address), int(network.broadcast_address)
        starts, ends = self.protected[network.version]
        # the first protected range that does not end below the network overlaps it if it
        # starts within it (bisect: a list of thousands of trusted networks costs no more)
        index = bisect.bisect_left(ends, low)
        return index == len(ends) or starts[index] > high

    def _widen(self, plan: SetPlan, over: int) -> int:
        """Move groups of ``plan``'s elements into their wider networks, largest group first,
        until ``over`` elements made room; how many did."""
        step = wider_prefix(plan.block_set.version, plan.block_set.prefix)
        if step is None:
            return 0
        wider = BlockSet(plan.block_set.version, step)
        groups: dict[int, list[int]] = {}
        for key in plan.movable():
            groups.setdefault(wider.key(key), []).append(key)
        freed = 0
        # the largest groups first (most room for one element), the lowest network among equals;
        # checked against the protected networks one by one: a full set may hold 65536 groups
        for wide_key in sorted(groups, key=lambda w: (-len(groups[w]), w)):
            if freed >= over:
                break
            network = wider.network(wide_key)
            if not self._may_block(network):
                continue
            keys = groups[wide_key]
            holder = self.holder(network)
            if holder is None:  # else it is blocked already: its elements were redundant
                holder = self.set_plan(wider), wide_key
                holder[0].new[wide_key] = None
            target, target_key = holder
            target.held.add(target_key)
            covers = self._widened.setdefault((target.block_set, target_key), [])
            took = self._took.setdefault((target.block_set, target_key), [])
            for key in keys:
                # an element that took others over before hands them on
                covers += self._widened.pop((plan.block_set, key), []) or [plan.block_set.network(key)]
                took += self._took.pop((plan.block_set, key), [])
                if key in plan.present:
                    took.append((plan, key))
                plan.take(key)
            freed += len(keys)
        return freed

    def _evict(self, plan: SetPlan, over: int) -> int:
        """Lift up to ``over`` blocks of ``plan`` that hold nothing of the batch, those closest to
        their expiry first (without timeout: only from a set made anew, last); how many."""
        candidates = [key for key, element in plan.present.items()
                      if key not in plan.removed and key not in plan.held
                      and (element.timeout is not None or plan.migrate)]
        candidates.sort(key=lambda k: (plan.present[k].timeout is None, plan.present[k].expires or 0, k))
        for key in candidates[:over]:
            plan.take(key)
            self._lifted(plan, key)
        return len(candidates[:over])

    def _leave_out(self, plan: SetPlan, over: int) -> None:
        """Drop ``over`` new elements of ``plan``: those that hold the fewest items of the
        batch, the last planned first among equals."""
        block_set = plan.block_set
        weight: dict[int, int] = {}  # items of the batch inside each element of this set
        for request in self.requests:
            if request.version == block_set.version and request.prefixlen >= block_set.prefix:
                key = block_set.key(int(request.network_address))
                weight[key] = weight.get(key, 0) + 1
        order = list(plan.new)
        place = {key: index for index, key in enumerate(order)}
        for key in sorted(order, key=lambda k: (weight.get(k, 0), -place[k]))[:over]:
            plan.take(key)
            self._widened.pop((plan.block_set, key), None)
            for source, taken in self._took.pop((plan.block_set, key), []):
                self._lifted(source, taken)

    def _lifted(self, plan: SetPlan, key: int) -> None:
        self.evicted.append({"network": plan.text(key), "set": plan.name, "expires_in": plan.present[key].expires})

    # -- reporting --------------------------------------------------------------------------------
    def _report(self, timeout: int, now: datetime.datetime) -> None:
        """What holds each item of the batch once the plan is written."""
        ends = until(timeout, now)
        for network in self.requests:
            entry: dict[str, Any] = {"requested": network_text(network), "family": f"ipv{network.version}"}
            holder = self.holder(network)
            if holder is None:
                own = BlockSet(network.version, network.prefixlen)
                self.not_blocked.append({"network": network_text(network), "set": own.name})
                continue
            plan, key = holder
            entry.update(network=plan.text(key), set=plan.name, already_blocked=key in plan.present)
            element = plan.present.get(key)
            if element is None or key in plan.refreshed:
                self.report.append(dict(entry, timeout=timeout, until=ends))
            elif element.timeout is None:  # permanent: nothing to refresh
                self.unchanged.append(dict(entry, expires_in=None))
                self.report.append(dict(entry, timeout=None, until=None))
            else:
                self.unchanged.append(dict(entry, expires_in=element.expires))
                self.report.append(dict(entry, timeout=element.timeout, until=until(element.expires, now)))
