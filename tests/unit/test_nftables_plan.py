"""Planning a batch against full block sets (module_utils.nftables_plan), pure logic: which
networks are widened, that a protected network is never covered, IPv4 and IPv6, sets already
full of live blocks, blocks close to expiry. nft itself runs in
tests/integration/test_block_and_cut_modules.py."""

from __future__ import annotations

import datetime
import ipaddress
import random
from collections.abc import Iterable, Sequence

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.nftables_block import parse_networks
from ansible_collections.virtguard.console.plugins.module_utils.nftables_plan import (
    WIDENING_PREFIXES,
    BatchPlan,
    BlockSet,
    Element,
    SetPlan,
    SetState,
    wider_prefix,
)

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def element(address: str, expires: int | None = 500, timeout: int | None = 600) -> Element:
    value = ipaddress.ip_address(address)
    return Element(value.version, int(value), timeout, expires if timeout is not None else None)


def planned(requests: Sequence[str], size: int, present: dict[str, list[Element]] | None = None,
            protected: Iterable[str] = (), refresh: bool = True) -> BatchPlan:
    """The plan of ``requests`` against sets holding ``present`` (set name -> elements), all of
    ``size``."""
    sets: dict[BlockSet, SetPlan] = {}
    for name, elements in (present or {}).items():
        block_set = BlockSet.parse(name)
        assert block_set is not None
        kind = f"ipv{block_set.version}_addr"
        sets[block_set] = SetPlan(block_set, SetState(name, kind, ("timeout",), size, tuple(elements)), size)
    plan = BatchPlan(sets, size, [ipaddress.ip_network(p) for p in protected])
    plan.plan(parse_networks(requests), 600, refresh, NOW)
    return plan


def live(plan: BatchPlan) -> dict[str, set[IPNetwork]]:
    """What each set holds once the plan is written, as networks."""
    held: dict[str, set[IPNetwork]] = {}
    for block_set, set_plan in plan.sets.items():
        keys = [k for k in set_plan.present if k not in set_plan.removed] + list(set_plan.new)
        held[block_set.name] = {block_set.network(k) for k in keys}
    return held


def holds(plan: BatchPlan, address: str) -> bool:
    value = ipaddress.ip_address(address)
    return any(value in network for networks in live(plan).values() for network in networks)


def check_sizes(plan: BatchPlan) -> None:
    for set_plan in plan.sets.values():
        assert set_plan.count() <= set_plan.size, f"{set_plan.name} holds {set_plan.count()}"


def test_the_widening_steps():
    assert WIDENING_PREFIXES == {4: (24, 16, 8), 6: (64, 48, 32, 16)}
    assert [wider_prefix(4, p) for p in (32, 28, 24, 16, 8)] == [24, 24, 16, 8, None]
    assert [wider_prefix(6, p) for p in (128, 64, 56, 48, 16)] == [64, 48, 48, 32, None]


def test_thirty_ipv4_offenders_fit_in_a_set_of_ten_by_their_largest_slash_24s():
    batch = ([f"198.18.1.{i}" for i in range(1, 14)] + [f"198.18.2.{i}" for i in range(1, 14)]
             + [f"198.18.3.{i}" for i in range(1, 5)])
    plan = planned(batch, 10)
    check_sizes(plan)
    assert plan.not_blocked == [] and plan.evicted == []
    assert [(w["network"], w["set"], len(w["covers"])) for w in plan.widened] == [
        ("198.18.1.0/24", "blocked_ipv4_p24", 13), ("198.18.2.0/24", "blocked_ipv4_p24", 13)]
    # the smallest group keeps its own addresses: nothing is widened that need not be
    assert live(plan)["blocked_ipv4"] == {ipaddress.ip_network(f"198.18.3.{i}/32") for i in range(1, 5)}
    by_request = {e["requested"]: e for e in plan.report}
    assert len(by_request) == 30 and by_request["198.18.2.7"]["network"] == "198.18.2.0/24"
    assert not any(e["already_blocked"] for e in plan.report)


def test_scattered_offenders_cascade_to_the_next_wider_prefix():
    batch = [f"10.7.{i}.1" for i in range(30)]  # 30 different /24s of one /16
    plan = planned(batch, 10)
    check_sizes(plan)
    assert plan.not_blocked == []
    assert live(plan)["blocked_ipv4_p16"] == {ipaddress.ip_network("10.7.0.0/16")}
    # the /24s of the first step went on into the /16: only what is written is reported
    assert plan.widened == [{"network": "10.7.0.0/16", "set": "blocked_ipv4_p16",
                             "covers": [f"10.7.{i}.1" for i in range(20)]}]
    assert live(plan)["blocked_ipv4_p24"] == set()
    assert all(e["network"] in ("10.7.0.0/16", e["requested"]) for e in plan.report)


def test_a_set_already_full_of_live_blocks_widens_them_too():
    present = {"blocked_ipv4": [element(f"203.0.113.{i}") for i in range(1, 11)]}
    plan = planned(["192.0.2.5"], 10, present)
    check_sizes(plan)
    assert plan.widened == [{"network": "203.0.113.0/24", "set": "blocked_ipv4_p24",
                             "covers": [f"203.0.113.{i}" for i in range(1, 11)]}]
    assert live(plan) == {"blocked_ipv4": {ipaddress.ip_network("192.0.2.5/32")},
                          "blocked_ipv4_p24": {ipaddress.ip_network("203.0.113.0/24")}}
    assert len(plan.sets[BlockSet(4, 32)].removed) == 10  # deleted in the same transaction
    assert plan.report[0]["network"] == "192.0.2.5" and plan.evicted == []


def test_a_protected_network_is_never_covered():
    # the /24 of the largest group holds a trusted admin; its /16 holds the other groups too
    batch = ([f"198.18.1.{i}" for i in range(1, 11)] + [f"198.18.2.{i}" for i in range(1, 9)]
             + [f"198.18.3.{i}" for i in range(1, 9)])
    plan = planned(batch, 10, protected=["198.18.1.200/32"])
    check_sizes(plan)
    assert plan.not_blocked == []
    assert live(plan)["blocked_ipv4_p24"] == {ipaddress.ip_network("198.18.2.0/24"),
                                              ipaddress.ip_network("198.18.3.0/24")}
    assert not holds(plan, "198.18.1.200")


@pytest.mark.parametrize("seed", range(40))
def test_whatever_the_batch_no_set_overflows_and_no_widened_network_touches_a_protected_one(seed):
    rng = random.Random(seed)
    size = rng.choice((2, 5, 10))
    v4 = [f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(1, 255)}" for _n in range(rng.randrange(1, 60))]
    v6 = [f"2001:db8:{rng.randrange(3):x}:{rng.randrange(4):x}::/64" for _n in range(rng.randrange(0, 30))]
    protected = [f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(1, 255)}/32",
                 f"2001:db8:{rng.randrange(3):x}:{rng.randrange(4):x}::7/128"]
    present = {"blocked_ipv4": [element(f"10.{rng.randrange(3)}.9.{i}", expires=rng.randrange(1, 600))
                                for i in range(rng.randrange(size + 1))]}
    plan = planned(v4 + v6, size, present, protected=protected)
    check_sizes(plan)
    assert all(ipaddress.ip_network(w["network"]) in live(plan)[w["set"]] for w in plan.widened)
    guarded = [ipaddress.ip_network(p) for p in protected]
    for widened in plan.widened:
        network = ipaddress.ip_network(widened["network"])
        assert not any(network.overlaps(g) for g in guarded if g.version == network.version), widened
    # a protected address is blocked only where the batch itself asked for a network holding it
    asked = parse_networks(v4 + v6) + [ipaddress.ip_network(e.address) for e in present["blocked_ipv4"]]
    for guard in guarded:
        if holds(plan, str(guard.network_address)):
            assert any(guard.overlaps(n) for n in asked if n.version == guard.version), f"{guard} is covered"
    left_out = {e["network"] for e in plan.not_blocked}
    for request in parse_networks(v4 + v6):
        assert holds(plan, str(request.network_address)) != (str(request).removesuffix("/32") in left_out)


def test_ipv6_prefixes_widen_to_48_and_addresses_in_ipv4_embedding_ranges_never_widen():
    batch = [f"2001:db8:5:{i:x}::/64" for i in range(12)] + ["2001:db8:6::/64"]
    plan = planned(batch, 10)
    check_sizes(plan)
    assert [w["network"] for w in plan.widened] == ["2001:db8:5::/48"]
    assert live(plan)["blocked_ipv6_p64"] == {ipaddress.ip_network("2001:db8:6::/64")}

    plain = [f"2001:db8:9::{i:x}" for i in range(1, 4)]
    nat64 = [f"64:ff9b::{i:x}" for i in range(1, 4)]  # a /64 there is every IPv4 host behind NAT64
    plan = planned(plain + nat64, 3)
    check_sizes(plan)
    assert [w["network"] for w in plan.widened] == ["2001:db8:9::/64"]
    assert live(plan)["blocked_ipv6"] == {ipaddress.ip_network(f"{a}/128") for a in nat64}


def test_where_no_wider_network_is_free_the_blocks_closest_to_expiry_make_room():
    present = {"blocked_ipv4": [element("192.0.2.1", expires=300), element("192.0.2.2", expires=20),
                                element("192.0.2.3", expires=5), element("192.0.2.4", timeout=None),
                                element("192.0.2.5", expires=1)]}
    # 192.0.2.5 is an offender of this batch again: it is refreshed, never evicted
    plan = planned(["192.0.2.5", "192.0.2.8", "192.0.2.9"], 5, present, protected=["192.0.2.0/24"])
    check_sizes(plan)
    assert plan.widened == [] and plan.not_blocked == []
    assert plan.evicted == [{"network": "192.0.2.3", "set": "blocked_ipv4", "expires_in": 5},
                            {"network": "192.0.2.2", "set": "blocked_ipv4", "expires_in": 20}]
    assert live(plan)["blocked_ipv4"] == {ipaddress.ip_network(f"192.0.2.{i}/32") for i in (1, 4, 5, 8, 9)}
    assert list(plan.sets[BlockSet(4, 32)].refreshed) == [int(ipaddress.ip_address("192.0.2.5"))]


def test_a_block_close_to_expiry_that_is_widened_gets_the_new_timeout():
    present = {"blocked_ipv4": [element("192.0.2.1", expires=2), element("192.0.2.2", expires=2)]}
    plan = planned(["192.0.2.3"], 2, present)
    assert plan.widened[0]["covers"] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert plan.sets[BlockSet(4, 24)].written() == [int(ipaddress.ip_address("192.0.2.0"))]
    assert plan.report[0]["network"] == "192.0.2.0/24" and plan.report[0]["timeout"] == 600


def test_when_nothing_else_helps_the_rest_is_left_out_and_what_it_replaced_is_reported_lifted():
    present = {"blocked_ipv4": [element("10.0.1.1")]}
    # /32 holds one; both /24s are needed, the /24 set holds one, and the /16 holds a protected address
    plan = planned(["10.0.0.1", "10.0.0.2", "10.0.1.2"], 1, present, protected=["10.0.255.255/32"])
    check_sizes(plan)
    assert [w["network"] for w in plan.widened] == ["10.0.0.0/24"]  # the one holding most of the batch
    assert plan.not_blocked == [{"network": "10.0.1.2", "set": "blocked_ipv4"}]
    assert plan.evicted == [{"network": "10.0.1.1", "set": "blocked_ipv4", "expires_in": 500}]
    assert holds(plan, "10.0.0.1") and holds(plan, "10.0.0.2") and not holds(plan, "10.0.1.1")


def test_blocks_without_timeout_are_never_taken_away():
    present = {"blocked_ipv4": [element(f"192.0.2.{i}", timeout=None) for i in range(1, 4)]}
    plan = planned(["192.0.2.9"], 3, present, protected=["192.0.2.0/24"])
    assert plan.not_blocked == [{"network": "192.0.2.9", "set": "blocked_ipv4"}] and plan.evicted == []
    widened = planned(["192.0.2.9"], 3, present)
    assert widened.widened[0]["covers"] == ["192.0.2.9"] and not widened.sets[BlockSet(4, 32)].removed


def test_blocks_inside_a_network_already_blocked_make_room_at_no_cost():
    present = {"blocked_ipv4": [element("198.51.100.1"), element("198.51.100.2")],
               "blocked_ipv4_p24": [element("198.51.100.0")]}
    plan = planned(["192.0.2.1"], 2, present)
    assert plan.widened == [{"network": "198.51.100.0/24", "set": "blocked_ipv4_p24",
                             "covers": ["198.51.100.1", "198.51.100.2"]}]
    assert live(plan)["blocked_ipv4_p24"] == {ipaddress.ip_network("198.51.100.0/24")}
    assert plan.sets[BlockSet(4, 24)].written() == []  # nothing new there


# -- pure helpers, at their edges --------------------------------------------------------------------

def test_until_is_the_end_of_a_block_or_none_without_timeout():
    import datetime

    from ansible_collections.virtguard.console.plugins.module_utils.nftables_plan import until

    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert until(90, now) == "2026-01-01T00:01:30+00:00"
    assert until(None, now) is None


def test_protected_networks_merge_into_disjoint_ranges_touching_ones_included():
    import ipaddress

    from ansible_collections.virtguard.console.plugins.module_utils.nftables_plan import _address_ranges

    def ranges(*texts: str) -> dict[int, tuple[list[str], list[str]]]:
        merged = _address_ranges(ipaddress.ip_network(t) for t in texts)
        return {v: ([str(ipaddress.ip_address(a) if v == 4 else ipaddress.IPv6Address(a)) for a in starts],
                    [str(ipaddress.ip_address(a) if v == 4 else ipaddress.IPv6Address(a)) for a in ends])
                for v, (starts, ends) in merged.items()}

    # adjacent (10.0.1.0 follows 10.0.0.255) and contained ones merge; a gap of one address does not
    assert ranges("10.0.0.0/24", "10.0.1.0/24", "10.0.0.7/32", "10.0.2.1/32", "2001:db8::/64")[4] == (
        ["10.0.0.0", "10.0.2.1"], ["10.0.1.255", "10.0.2.1"])
    assert ranges("10.0.0.0/16", "10.0.3.0/24", "10.2.0.0/24")[4] == (["10.0.0.0", "10.2.0.0"],
                                                                      ["10.0.255.255", "10.2.0.255"])
    assert ranges("2001:db8::/64")[6] == (["2001:db8::"], ["2001:db8::ffff:ffff:ffff:ffff"])
    assert ranges()[4] == ([], [])


def test_block_set_names_take_prefixes_from_the_widest_allowed_to_the_host():
    from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import MIN_IPV4_PREFIX, MIN_IPV6_PREFIX
    from ansible_collections.virtguard.console.plugins.module_utils.nftables_plan import BlockSet

    assert BlockSet.parse(f"blocked_ipv4_p{MIN_IPV4_PREFIX}") == BlockSet(4, MIN_IPV4_PREFIX)
    assert BlockSet.parse(f"blocked_ipv4_p{MIN_IPV4_PREFIX - 1}") is None
    assert BlockSet.parse(f"blocked_ipv6_p{MIN_IPV6_PREFIX}") == BlockSet(6, MIN_IPV6_PREFIX)
    assert BlockSet.parse("blocked_ipv6_p129") is None
