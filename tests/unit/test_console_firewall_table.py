"""The console firewall's table: the spec, what differs from a host's table, the transaction,
and nft's JSON listing (module_utils.console_firewall_ruleset, console_firewall_listing,
console_firewall_table). The listing is one captured with nftables 1.0.6 from a lab host after
the module made the table (allowed 10.221.112.0/24 and fd00::/8, ports 5700-6899) and one new
connection was let through and one refused (from 192.0.2.2). The rate-limited listing is one
captured after a table with rate limits (3 a second per source, 50 in all; 127.0.0.1 allowed
too) let 20 of 100 fast connections from 127.0.0.1 through and refused 80, then one more through.
Real nft runs in tests/integration/test_console_firewall.py."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_listing import (
    element_range,
    parse_table,
)
from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_ruleset import (
    ALLOWED_SET,
    PORT_SET,
    REFUSED_SOURCES_SET,
    FirewallError,
    SetDeclaration,
    TableState,
    allowed_networks,
    differences,
    make_spec,
    script,
)
from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_table import FirewallTable
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import merge_ranges

FIXTURES = Path(__file__).parent / "fixtures" / "console_firewall"
LISTING = (FIXTURES / "nft_table.json").read_text()
RATE_LIMITED_LISTING = (FIXTURES / "nft_table_rate_limited.json").read_text()
TABLE = "virtguard_console_firewall"
RANGES = [(5700, 5899), (5900, 6899)]


def spec(allowed=("10.221.112.0/24", "fd00::/8"), ports=None, priority=-20, rate_per_source=0, rate_total=0):
    return make_spec(TABLE, priority, allowed, RANGES if ports is None else ports, rate_per_source, rate_total)


def rate_limited_spec(rate_per_source=3, rate_total=50):
    return make_spec(TABLE, -20, ["10.221.112.0/24", "fd00::/8", "127.0.0.1"], [(5700, 6899)],
                     rate_per_source, rate_total)


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


# -- the spec ---------------------------------------------------------------------------------------
def test_allowed_networks_are_collapsed_per_family_and_mapped_ones_are_ipv4():
    networks = allowed_networks(["10.0.0.0/25", "10.0.0.128/25", "::ffff:192.0.2.0/120", "2001:db8::1",
                                 "192.0.2.7", "10.0.0.9"])
    assert [str(n) for n in networks[4]] == ["10.0.0.0/24", "192.0.2.0/24"]
    assert [str(n) for n in networks[6]] == ["2001:db8::1/128"]


@pytest.mark.parametrize("bad, message", [
    (["10.0.0.0/33"], "allowed_networks: '10.0.0.0/33' is not a network"),
    (["kvm1.example.com"], "neither an IP address nor a network"),
    ([], "allowed_networks is empty"),
])
def test_wrong_allowed_networks_are_refused_naming_the_item(bad, message):
    with pytest.raises(FirewallError, match=message):
        spec(allowed=bad)


@pytest.mark.parametrize("table, priority, ports, message", [
    ("virtguard console", -20, RANGES, "table 'virtguard console' must be a letter"),
    ("x" * 32, -20, RANGES, "at most 31"),
    (TABLE, True, RANGES, "priority must be a whole number"),
    (TABLE, -500, RANGES, "priority must be a whole number"),
    (TABLE, -20, [], "no console port to guard"),
])
def test_wrong_settings_are_refused(table, priority, ports, message):
    with pytest.raises(FirewallError, match=message):
        make_spec(table, priority, ["10.0.0.0/8"], ports)


def test_only_a_lone_syn_of_a_new_connection_to_a_console_port_is_judged():
    rules = spec().rules()
    assert rules[0].chain == "input"
    assert rules[0].text == ("tcp dport @console_ports tcp flags & (fin|syn|rst|ack) == syn ct state new "
                             "jump console_new")
    judged = [rule.text for rule in rules[1:]]
    assert judged[:2] == ["ip saddr @allowed_ipv4 counter name allowed accept",
                          "ip6 saddr @allowed_ipv6 counter name allowed accept"]
    # the reset is a rule of its own, after the sources' update: a full set cannot stop it
    assert judged[-1] == "counter name refused reject with tcp reset"
    assert all(text.startswith("update @refused_ipv") for text in judged[2:4])


def test_rule_comments_change_with_the_rule_text():
    comments = [rule.comment for rule in spec().rules()]
    assert len(set(comments)) == len(comments)
    assert all(len(comment) < 128 for comment in comments)  # nft's limit
    assert [r.comment for r in spec(allowed=["10.0.0.0/8"], ports=[(5900, 5999)], priority=-30).rules()] == comments


# -- a listing --------------------------------------------------------------------------------------
def test_the_captured_listing_is_read():
    state = parse_table(LISTING, TABLE)
    assert set(state.chains) == {"input", "console_new"}
    assert state.chains["input"] == {"type": "filter", "hook": "input", "prio": -20, "policy": "accept"}
    assert state.chains["console_new"] == {}
    assert len(state.rule_comments["console_new"]) == 5
    assert state.elements[PORT_SET] == [(5700, 6899)]
    assert state.elements[ALLOWED_SET[4]] == [(ip("10.221.112.0"), ip("10.221.112.255"))]
    assert state.elements[ALLOWED_SET[6]] == [(ip("fd00::"), ip("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))]
    assert state.sets[REFUSED_SOURCES_SET[4]].timeout == 86400 and state.sets[REFUSED_SOURCES_SET[4]].counter
    assert REFUSED_SOURCES_SET[4] not in state.elements
    assert state.counters == {"allowed": {"packets": 1, "bytes": 60}, "refused": {"packets": 1, "bytes": 60}}
    [source] = state.refused_sources
    assert source["address"] == "192.0.2.2" and source["packets"] == 1 and source["bytes"] == 60
    assert 0 < source["expires_in"] <= 86400


def test_the_table_the_module_made_is_what_the_spec_says():
    assert differences(spec(), parse_table(LISTING, TABLE)) == []


@pytest.mark.parametrize("item, expected", [
    ("10.0.0.1", (ip("10.0.0.1"), ip("10.0.0.1"))),
    ({"prefix": {"addr": "10.0.0.0", "len": 8}}, (ip("10.0.0.0"), ip("10.255.255.255"))),
    ({"range": ["10.0.0.1", "10.0.0.5"]}, (ip("10.0.0.1"), ip("10.0.0.5"))),
    ({"elem": {"val": "::10.0.0.1", "expires": 5}}, (ip("::a00:1"), ip("::a00:1"))),
    ({"prefix": {"addr": "::", "len": 0}}, (0, 2**128 - 1)),
])
def test_set_elements_are_integer_ranges(item, expected):
    assert element_range(item, "ipv6_addr" if ":" in json.dumps(item) else "ipv4_addr") == expected


def test_port_elements_are_integer_ranges():
    assert element_range(5900, "inet_service") == (5900, 5900)
    assert element_range({"range": [5700, 5899]}, "inet_service") == (5700, 5899)


def test_a_listing_that_is_not_nfts_json_is_an_error():
    with pytest.raises(FirewallError, match="cannot read nft's JSON listing of table inet"):
        parse_table("{not json", TABLE)
    with pytest.raises(FirewallError, match="cannot read"):
        parse_table(json.dumps({"nftables": [{"set": {"name": "x", "table": TABLE}}]}), TABLE)


# -- differences and the transaction ------------------------------------------------------------
def edited(state: TableState, **changes: Any) -> TableState:
    return state._replace(**changes)


def test_a_missing_table_is_made_with_everything_in_one_transaction():
    lines = script(spec(), None)
    assert differences(spec(), None) == ["table inet virtguard_console_firewall does not exist"]
    assert lines[0] == "add table inet virtguard_console_firewall"
    assert not [line for line in lines if line.startswith(("delete", "flush chain"))]
    assert "add element inet virtguard_console_firewall console_ports { 5700-6899 }" in lines
    assert "add element inet virtguard_console_firewall allowed_ipv4 { 10.221.112.0/24 }" in lines
    assert "add element inet virtguard_console_firewall allowed_ipv6 { fd00::/8 }" in lines
    assert ("add chain inet virtguard_console_firewall input { type filter hook input priority -20; "
            "policy accept; }") in lines
    assert ("add set inet virtguard_console_firewall refused_ipv4_sources { type ipv4_addr; size 4096; "
            "flags dynamic,timeout; timeout 86400s; counter; }") in lines
    rules = [line for line in lines if line.startswith("add rule")]
    assert len(rules) == 6 and all(' comment "virtguard console firewall ' in rule for rule in rules)


def test_an_update_keeps_counters_and_refused_sources_and_rewrites_rules_and_owned_elements():
    state = parse_table(LISTING, TABLE)
    wider = spec(allowed=["10.221.112.0/24", "10.9.0.0/16", "fd00::/8"], ports=RANGES + [(7100, 7100)])
    assert differences(wider, state) == ["the elements of set console_ports differ",
                                         "the elements of set allowed_ipv4 differ"]
    lines = script(wider, state)
    assert not [line for line in lines if line.startswith("delete")]
    assert "flush set inet virtguard_console_firewall allowed_ipv4" in lines
    assert not [line for line in lines if "flush set" in line and "refused" in line]
    assert "add element inet virtguard_console_firewall console_ports { 5700-6899, 7100 }" in lines
    assert "add element inet virtguard_console_firewall allowed_ipv4 { 10.9.0.0/16, 10.221.112.0/24 }" in lines
    # every rule goes before anything is added again: the chains are flushed first
    assert lines.index("flush chain inet virtguard_console_firewall console_new") < lines.index(
        "flush set inet virtguard_console_firewall allowed_ipv4")


def test_a_changed_priority_makes_the_base_chain_anew():
    state = parse_table(LISTING, TABLE)
    assert differences(spec(priority=-25), state) == [
        "chain input is declared {'type': 'filter', 'hook': 'input', 'prio': -20, 'policy': 'accept'}, "
        "not {'type': 'filter', 'hook': 'input', 'prio': -25, 'policy': 'accept'}"]
    lines = script(spec(priority=-25), state)
    assert lines.index("flush chain inet virtguard_console_firewall input") < lines.index(
        "delete chain inet virtguard_console_firewall input") < lines.index(
        "add chain inet virtguard_console_firewall input { type filter hook input priority -25; policy accept; }")


def test_what_is_not_the_roles_is_removed_and_a_changed_rule_is_seen():
    state = parse_table(LISTING, TABLE)
    comments = dict(state.rule_comments, input=["hand-made"])
    extra = {"type": "filter", "hook": "input", "prio": 0, "policy": "accept"}
    odd = edited(state, chains=dict(state.chains, extra=extra),
                 sets=dict(state.sets, junk=state.sets[ALLOWED_SET[4]],
                           refused_ipv6_sources=state.sets[ALLOWED_SET[6]]),
                 counters=dict(state.counters, stray={"packets": 0, "bytes": 0}), rule_comments=comments)
    assert differences(spec(), odd) == [
        "chain extra is not the role's", "the rules of chain input are not the role's",
        "set refused_ipv6_sources is declared SetDeclaration(type='ipv6_addr', interval=True, size=None, "
        "timeout=None, counter=False), not SetDeclaration(type='ipv6_addr', interval=False, size=4096, "
        "timeout=86400, counter=True)",
        "set junk is not the role's", "counter stray is not the role's"]
    lines = script(spec(), odd)
    for line in ("delete chain inet virtguard_console_firewall extra",
                 "delete set inet virtguard_console_firewall junk",
                 "delete set inet virtguard_console_firewall refused_ipv6_sources",
                 "delete counter inet virtguard_console_firewall stray"):
        assert line in lines
    assert "delete set inet virtguard_console_firewall refused_ipv4_sources" not in lines
    first_delete = min(i for i, line in enumerate(lines) if line.startswith("delete"))
    assert all(line.startswith(("add table", "flush chain")) for line in lines[:first_delete])


def test_missing_counters_and_sets_are_differences():
    state = parse_table(LISTING, TABLE)
    sets = {k: v for k, v in state.sets.items() if k != PORT_SET}
    assert differences(spec(), edited(state, counters={}, sets=sets)) == [
        "set console_ports is missing", "counter allowed is missing", "counter refused is missing"]


def test_adjacent_networks_compare_equal_to_their_merge():
    state = parse_table(LISTING, TABLE)
    halves = spec(allowed=["10.221.112.0/25", "10.221.112.128/25", "fd00::/9", "fd80::/9"])
    assert differences(halves, state) == []
    assert merge_ranges([(1, 2), (3, 5), (9, 9), (4, 6)]) == [(1, 6), (9, 9)]


# -- the table on a host (a fake nft) --------------------------------------------------------------
class FakeNft:
    def __init__(self, listings: list[str | None]) -> None:
        self.listings = listings
        self.calls: list[tuple[list[str], str | None]] = []
        self.apply_rc = 0

    def __call__(self, argv: list[str], data: str | None = None) -> tuple[int, str, str]:
        self.calls.append((argv, data))
        if argv[:3] == ["nft", "-j", "list"]:
            listing = self.listings.pop(0)
            if listing is None:
                return 1, "", "Error: No such file or directory\nlist table inet virtguard_console_firewall\n"
            return 0, listing, ""
        if argv == ["nft", "-f", "-"]:
            error = "Error: Could not process rule: Operation not permitted\n"
            return self.apply_rc, "", error if self.apply_rc else ""
        return 0, "", ""

    def written(self) -> list[str]:
        return [data or "" for argv, data in self.calls if argv == ["nft", "-f", "-"]]


def test_apply_writes_once_reads_back_and_reports_the_counts():
    nft = FakeNft([None, LISTING])
    result = FirewallTable(nft, TABLE).apply(spec())
    assert result["changed"] and result["created"]
    assert result["changes"] == ["table inet virtguard_console_firewall does not exist"]
    assert len(nft.written()) == 1
    assert result["refused_attempts"] == 1 and result["allowed_attempts"] == 1
    assert [s["address"] for s in result["refused_sources"]] == ["192.0.2.2"]


def test_check_mode_and_an_unchanged_table_write_nothing():
    for check_mode, listings in ((True, [None]), (False, [LISTING])):
        nft = FakeNft(list(listings))
        result = FirewallTable(nft, TABLE).apply(spec(), check_mode=check_mode)
        assert result["changed"] == check_mode
        assert nft.written() == []


def test_a_table_that_is_not_what_was_written_fails_loudly():
    nft = FakeNft([None, LISTING])
    with pytest.raises(FirewallError, match="is not what was written: the elements of set allowed_ipv4 differ"):
        FirewallTable(nft, TABLE).apply(spec(allowed=["10.0.0.0/8", "fd00::/8"]))


def test_a_failed_transaction_says_the_table_was_left_as_it_was():
    nft = FakeNft([None])
    nft.apply_rc = 1
    with pytest.raises(FirewallError, match="left as it was: Error: Could not process rule"):
        FirewallTable(nft, TABLE).apply(spec())


def test_remove_deletes_the_table_once():
    nft = FakeNft([LISTING])
    result = FirewallTable(nft, TABLE).remove()
    assert result["changed"] and result["removed"] and result["refused_attempts"] == 1
    assert nft.calls[-1][0] == ["nft", "delete", "table", "inet", TABLE]
    nft = FakeNft([None])
    assert FirewallTable(nft, TABLE).remove() == {"changed": False, "removed": False, "allowed_attempts": 0,
                                                  "refused_attempts": 0, "rate_limited_attempts": 0,
                                                  "refused_sources": []}
    nft = FakeNft([LISTING])
    assert FirewallTable(nft, TABLE).remove(check_mode=True)["removed"]
    assert len(nft.calls) == 1


# -- rate limits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("rate_per_source", -1), ("rate_total", 1_000_001), ("rate_total", True),
                                          ("rate_per_source", "10")])
def test_wrong_rates_are_refused_naming_the_setting(field, value):
    with pytest.raises(FirewallError, match=f"^{field} must be a whole number .* got {value!r}$"):
        spec(**{field: value})


def test_without_a_limit_the_table_is_the_one_without_limits():
    assert spec(rate_per_source=0, rate_total=0) == spec()
    assert not [rule for rule in spec().rules() if "limit" in rule.text or rule.chain == "console_allowed"]
    assert "rate_limited" not in spec().counters() and "console_allowed" not in spec().chains()


def test_allowed_networks_go_through_the_limits_per_source_first_then_in_all():
    rules = [(rule.chain, rule.text) for rule in rate_limited_spec().rules() if rule.chain != "input"]
    assert rules == [
        ("console_new", "ip saddr @allowed_ipv4 goto console_allowed"),
        ("console_new", "ip6 saddr @allowed_ipv6 goto console_allowed"),
        ("console_new", "update @refused_ipv4_sources { ip saddr counter }"),
        ("console_new", "update @refused_ipv6_sources { ip6 saddr counter }"),
        ("console_new", "counter name refused reject with tcp reset"),
        ("console_allowed", "update @rate_ipv4_sources { ip saddr limit rate over 3/second burst 20 packets } "
                            "counter name rate_limited reject with tcp reset"),
        ("console_allowed", "update @rate_ipv6_sources { ip6 saddr & ffff:ffff:ffff:ffff:: limit rate over "
                            "3/second burst 20 packets } counter name rate_limited reject with tcp reset"),
        ("console_allowed", "limit rate over 50/second burst 100 packets counter name rate_limited reject with tcp "
                            "reset"),
        ("console_allowed", "counter name allowed accept"),
    ]
    only_total = [rule.text for rule in rate_limited_spec(rate_per_source=0).rules() if rule.chain == "console_allowed"]
    assert only_total == ["limit rate over 50/second burst 100 packets counter name rate_limited reject with tcp reset",
                          "counter name allowed accept"]
    assert "rate_ipv4_sources" not in rate_limited_spec(rate_per_source=0).sets()
    only_source = [rule.text for rule in rate_limited_spec(rate_total=0).rules() if rule.chain == "console_allowed"]
    assert len(only_source) == 3 and not any(text.startswith("limit") for text in only_source)


@pytest.mark.parametrize("rate, burst", [(1, 20), (10, 20), (11, 22), (500, 1000)])
def test_the_burst_is_twice_the_rate_and_at_least_twenty(rate, burst):
    [total] = [rule.text for rule in rate_limited_spec(0, rate).rules() if rule.text.startswith("limit")]
    assert total.startswith(f"limit rate over {rate}/second burst {burst} packets ")


def test_the_captured_rate_limited_listing_is_what_the_spec_says_and_its_counts_are_read():
    state = parse_table(RATE_LIMITED_LISTING, TABLE)
    assert differences(rate_limited_spec(), state) == []
    assert state.sets["rate_ipv6_sources"] == SetDeclaration("ipv6_addr", False, 65535, 60, False)
    assert "rate_ipv4_sources" not in state.elements  # the buckets are the kernel's, never compared
    nft = FakeNft([RATE_LIMITED_LISTING])
    result = FirewallTable(nft, TABLE).apply(rate_limited_spec())
    assert not result["changed"] and nft.written() == []
    assert (result["allowed_attempts"], result["rate_limited_attempts"], result["refused_attempts"]) == (21, 80, 0)


def test_changing_a_limit_rewrites_the_rules_and_keeps_the_buckets_and_counts():
    state = parse_table(RATE_LIMITED_LISTING, TABLE)
    changed = rate_limited_spec(rate_total=80)
    assert differences(changed, state) == ["the rules of chain console_allowed are not the role's"]
    lines = script(changed, state)
    assert not [line for line in lines if line.startswith("delete")]
    assert "add counter inet virtguard_console_firewall rate_limited" in lines  # nft keeps an existing one


def test_turning_the_limits_off_removes_their_chain_sets_and_counter():
    state = parse_table(RATE_LIMITED_LISTING, TABLE)
    off = rate_limited_spec(0, 0)
    assert differences(off, state) == [
        "chain console_allowed is not the role's", "the rules of chain console_new are not the role's",
        "set rate_ipv4_sources is not the role's", "set rate_ipv6_sources is not the role's",
        "counter rate_limited is not the role's"]
    lines = script(off, state)
    deletes = [line for line in lines if line.startswith("delete")]
    assert deletes == ["delete chain inet virtguard_console_firewall console_allowed",
                       "delete set inet virtguard_console_firewall rate_ipv4_sources",
                       "delete set inet virtguard_console_firewall rate_ipv6_sources",
                       "delete counter inet virtguard_console_firewall rate_limited"]
    assert lines.index("flush chain inet virtguard_console_firewall console_new") < lines.index(deletes[0])
    # and on again from the table without limits: the chain, the sets and the counter are made
    on = script(rate_limited_spec(), parse_table(LISTING, TABLE))
    for line in ("add chain inet virtguard_console_firewall console_allowed",
                 "add counter inet virtguard_console_firewall rate_limited",
                 "add set inet virtguard_console_firewall rate_ipv4_sources { type ipv4_addr; size 65535; "
                 "flags dynamic,timeout; timeout 60s; }"):
        assert line in on
