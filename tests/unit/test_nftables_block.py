"""The nftables block (module_utils.nftables_block): reading nft's output, planning a batch,
the one transaction it writes, verification, full sets, migration of a 0.1.0 table. nft's
outputs are captured from nftables 1.0.6 (tests/unit/fixtures/console_remediation); the real
thing runs in tests/integration/test_block_and_cut_modules.py."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import MAX_BLOCK_SECONDS, MAX_SET_SIZE
from ansible_collections.virtguard.console.plugins.module_utils.nftables_block import (
    RULE_COMMENT,
    BlockTable,
    SetFullError,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_output import (
    NftablesError,
    parse_chain_names,
    parse_get_output,
    parse_set_json,
)
from ansible_collections.virtguard.console.plugins.module_utils.nftables_plan import BlockSet, Element

FIXTURES = Path(__file__).parent / "fixtures" / "console_remediation"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# Table "virtguard" as captured: blocked_ipv4 {192.0.2.7 (600 s), 192.0.2.99 (no timeout)},
# blocked_ipv4_p24 {198.51.100.0}, blocked_ipv6 {::10.0.0.1, 2001:db8::5},
# blocked_ipv6_p64 {2001:db8:1:2::}, console_ports {5900-5999, 6012}; chains for each set.
CURRENT = {name: fixture(f"nft_set_{name}.json") for name in
           ("blocked_ipv4", "blocked_ipv4_p24", "blocked_ipv6", "blocked_ipv6_p64", "console_ports")}
# Table "old" as version 0.1.0 made it: plain sets without size, rules in "input" only.
OLD = {"blocked_ipv4": fixture("nft_set_old_blocked_ipv4.json"),
       "blocked_ipv6": fixture("nft_set_old_blocked_ipv6.json"),
       "console_ports": fixture("nft_set_old_console_ports.json")}
MISSING = fixture("nft_missing_set.stderr")


def nft_text(address: str) -> str:
    """An address as nft prints it (inet_ntop): ::10.0.0.1 where Python says ::a00:1."""
    value = ipaddress.ip_address(address)
    family = socket.AF_INET if value.version == 4 else socket.AF_INET6
    return socket.inet_ntop(family, value.packed)


class FakeNft:
    """Answers like nft 1.0.6 from captured listings; records the scripts it is given.

    ``get element`` scripts are answered in nft's text form for every element asked, except
    those in ``absent`` (nft then stops, as it does). ``write_errors`` are the stderr of the
    next failing writes."""

    def __init__(self, table: str = "virtguard", sets: dict[str, str] | None = None,
                 chains: str = fixture("nft_list_chains.json"), absent: frozenset[str] = frozenset(),
                 write_errors: list[str] | None = None):
        self.table = table
        self.sets = dict(CURRENT if sets is None else sets)
        self.chains = chains
        self.absent = {ipaddress.ip_address(a) for a in absent}
        self.write_errors = list(write_errors or [])
        self.scripts: list[str] = []
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], data: str | None = None) -> tuple[int, str, str]:
        self.calls.append(argv)
        if argv == ["nft", "-j", "list", "chains", "inet"]:
            return 0, self.chains, ""
        if argv[:4] == ["nft", "-j", "list", "set"]:
            assert argv[4:6] == ["inet", self.table]
            if argv[6] in self.sets:
                return 0, self.sets[argv[6]], ""
            return 1, "", MISSING
        assert argv == ["nft", "-f", "-"], argv
        assert data is not None
        if data.startswith("get element"):
            return self.get(data)
        self.scripts.append(data)
        if self.write_errors:
            return 1, "", self.write_errors.pop(0)
        return 0, "", ""

    def get(self, script: str) -> tuple[int, str, str]:
        out: list[str] = []
        for number, line in enumerate(script.splitlines(), 1):
            match = re.match(r"get element inet \S+ (\S+) \{ (.*) \}$", line)
            assert match is not None, line
            name, elements = match.groups()
            values = [ipaddress.ip_address(e) for e in elements.split(", ")]
            if any(v in self.absent for v in values):
                return 1, "".join(out), (f"/dev/stdin:{number}:1-{len(line)}: Error: Could not process rule: "
                                         f"No such file or directory\n{line}\n")
            printed = ", ".join(f"{nft_text(str(v))} timeout 10m expires 9m59s720ms" for v in values)
            out.append(f"table inet {self.table} {{\n\tset {name} {{\n\t\ttype ipv{values[0].version}_addr\n"
                       f"\t\tsize 65536\n\t\tflags timeout\n\t\telements = {{ {printed} }}\n\t}}\n}}\n")
        return 0, "".join(out), ""

    def writes(self) -> list[str]:
        return [line for script in self.scripts for line in script.splitlines()]


def triple(table: str, set_name: str, element: str, timeout: int) -> list[str]:
    prefix = f"inet {table} {set_name}"
    return [f"add element {prefix} {{ {element} }}", f"delete element {prefix} {{ {element} }}",
            f"add element {prefix} {{ {element} timeout {timeout}s }}"]


# -- reading nft's output -----------------------------------------------------------------------

def test_set_listings_are_read_as_values():
    ipv4 = parse_set_json(CURRENT["blocked_ipv4"])
    assert (ipv4.name, ipv4.type, ipv4.flags, ipv4.size) == ("blocked_ipv4", "ipv4_addr", ("timeout",), 65536)
    assert ipv4.elements == (Element(4, int(ipaddress.ip_address("192.0.2.7")), 600, 599),
                             Element(4, int(ipaddress.ip_address("192.0.2.99")), None, None))
    ipv6 = parse_set_json(CURRENT["blocked_ipv6"])
    assert {e.address for e in ipv6.elements} == {int(ipaddress.ip_address("::a00:1")),
                                                  int(ipaddress.ip_address("2001:db8::5"))}
    assert parse_set_json(CURRENT["console_ports"]).elements == ((5900, 5999), (6012, 6012))
    old = parse_set_json(OLD["blocked_ipv4"])
    assert old.size is None and old.flags == ("timeout",)
    with pytest.raises(NftablesError, match="cannot read"):
        parse_set_json('{"nftables": []}')


def test_chains_and_get_output_are_read():
    names = [c["name"] for c in parse_chain_names(fixture("nft_list_chains.json"), "virtguard")]
    assert names == ["input", "blocked_ipv4_p24", "blocked_ipv4", "blocked_ipv6_p64", "blocked_ipv6"]
    assert [c["name"] for c in parse_chain_names(fixture("nft_list_chains.json"), "old")] == ["input"]
    found = parse_get_output(fixture("nft_get_elements.txt"))

    def key(address: str) -> tuple[int, int]:
        value = ipaddress.ip_address(address)
        return value.version, int(value)

    assert found == {"blocked_ipv4": {key("192.0.2.7"), key("192.0.2.99")},
                     "blocked_ipv6": {key("::a00:1"), key("2001:db8::5")},
                     "blocked_ipv6_p64": {key("2001:db8:1:2::")}}


def test_block_set_names_and_rule_matches():
    assert BlockSet.parse("blocked_ipv6_p64") == BlockSet(6, 64)
    assert BlockSet.parse("blocked_ipv4") == BlockSet(4, 32)
    assert BlockSet.parse("blocked_ipv4_p4") is None and BlockSet.parse("input") is None
    assert BlockSet(6, 64).match_expression() == "ip6 saddr & ffff:ffff:ffff:ffff::"
    assert BlockSet(4, 24).match_expression() == "ip saddr & 255.255.255.0"
    assert BlockSet(6, 128).match_expression() == "ip6 saddr"
    prefix_64 = BlockSet(6, 64)
    assert prefix_64.element_text(prefix_64.key(int(ipaddress.ip_address("2001:db8:1:2::5")))) == "2001:db8:1:2::"


# -- checking before anything runs --------------------------------------------------------------

@pytest.mark.parametrize("addresses, timeout, ports", [
    (["1.2.3.4; flush ruleset"], 5, []), (["10.0.0.0/7"], 5, []), (["2001:db8::/15"], 5, []),
    (["1.2.3.4"], 5, ["59x"]), (["1.2.3.4"], 0, []), (["1.2.3.4"], MAX_BLOCK_SECONDS + 1, []),
    (["1.2.3.4"], True, []), (["1.2.3.4"], "600", []), ([None], 5, []),
])
def test_bad_input_is_refused_before_nft_runs(addresses, timeout, ports):
    fake = FakeNft()
    with pytest.raises(NftablesError):
        BlockTable(fake).block(addresses, timeout, ports)
    assert fake.calls == []


@pytest.mark.parametrize("kwargs", [{"table": "bad name"}, {"set_size": 0}, {"set_size": MAX_SET_SIZE + 1},
                                    {"chain": "blocked_ipv4"}])
def test_bad_table_settings_are_refused(kwargs):
    with pytest.raises(NftablesError):
        BlockTable(FakeNft(), **kwargs)


# -- planning and writing -----------------------------------------------------------------------

def test_a_batch_is_one_transaction_planned_against_what_is_blocked():
    fake = FakeNft()
    result = BlockTable(fake).block(
        ["192.0.2.7", "192.0.2.8", "2001:db8:1:2::99", "198.51.100.7", "::ffff:10.0.0.5", "::10.0.0.1",
         "192.0.2.99"], 900, ["5901"])
    assert len(fake.scripts) == 1
    lines = fake.writes()
    for element_lines in (triple("virtguard", "blocked_ipv4", "192.0.2.7", 900),       # present: refreshed
                          triple("virtguard", "blocked_ipv4", "192.0.2.8", 900),       # new
                          triple("virtguard", "blocked_ipv4", "10.0.0.5", 900),        # IPv4-mapped: IPv4
                          triple("virtguard", "blocked_ipv6", "::a00:1", 900),         # nft's ::10.0.0.1
                          triple("virtguard", "blocked_ipv6_p64", "2001:db8:1:2::", 900),  # its /64 holds it
                          triple("virtguard", "blocked_ipv4_p24", "198.51.100.0", 900)):
        assert "\n".join(element_lines) in "\n".join(lines)
    # held by a blocked network: no element of its own; permanent element: left alone
    assert not any("2001:db8:1:2::99" in line or "198.51.100.7 " in line or "192.0.2.99" in line for line in lines)
    assert "add element inet virtguard console_ports { 5901 }" in lines
    assert not any(line.startswith(("add set inet virtguard blocked", "delete set")) for line in lines)
    # every block set keeps its chain and rule, written anew in the same transaction
    assert "flush chain inet virtguard input" in lines
    for name, match in (("blocked_ipv4", "ip saddr"), ("blocked_ipv4_p24", "ip saddr & 255.255.255.0"),
                        ("blocked_ipv6", "ip6 saddr"), ("blocked_ipv6_p64", "ip6 saddr & ffff:ffff:ffff:ffff::")):
        assert f"add rule inet virtguard input jump {name}" in lines
        assert (f"add rule inet virtguard {name} {match} @{name} tcp dport @console_ports reject with tcp reset "
                f'comment "{RULE_COMMENT}"') in lines

    by_request = {entry["requested"]: entry for entry in result["blocked"]}
    assert by_request["2001:db8:1:2::99"] == dict(by_request["2001:db8:1:2::99"], network="2001:db8:1:2::/64",
                                                  set="blocked_ipv6_p64", already_blocked=True, timeout=900)
    assert by_request["10.0.0.5"]["already_blocked"] is False and by_request["192.0.2.7"]["already_blocked"] is True
    assert by_request["192.0.2.99"]["timeout"] is None and result["unchanged"][0]["network"] == "192.0.2.99"
    assert result["verified"] and not result["set_full"] and not result["ruleset_created"]
    assert result["ports"] == ["5900-5999", "6012"]  # the port set as read back after the write
    # reads: the chains, the block sets of both families, the ports; no table listing
    assert not any(argv[:4] == ["nft", "-j", "list", "table"] for argv in fake.calls)


def test_a_network_and_addresses_inside_it_in_one_batch_make_one_element():
    fake = FakeNft(sets={}, chains='{"nftables": []}')
    result = BlockTable(fake).block(["2001:db8:7::5", "2001:db8:7::/64", "2001:db8:7::6"], 60, [])
    assert [e["network"] for e in result["blocked"]] == ["2001:db8:7::/64"] * 3
    assert [e["requested"] for e in result["blocked"]] == ["2001:db8:7::/64", "2001:db8:7::5", "2001:db8:7::6"]
    lines = fake.writes()
    assert [line for line in lines if line.startswith("add element")] == [
        "add element inet virtguard blocked_ipv6_p64 { 2001:db8:7:: }",
        "add element inet virtguard blocked_ipv6_p64 { 2001:db8:7:: timeout 60s }"]
    # a new table: everything declared, sized
    assert "add set inet virtguard blocked_ipv6_p64 { type ipv6_addr; flags timeout; size 65536; }" in lines
    assert result["ruleset_created"] and result["warnings"]  # no console port known yet


def test_verification_compares_values_not_text():
    # nft prints the IPv4-compatible address as ::10.0.0.1, the module wrote ::a00:1
    result = BlockTable(FakeNft()).block(["::10.0.0.1", "::10.0.0.2"], 60, [])
    assert result["verified"]


def test_an_element_missing_after_the_write_is_an_error_naming_it():
    with pytest.raises(NftablesError, match=r"^10\.9\.9\.9 not in blocked_ipv4 after the update"):
        BlockTable(FakeNft(absent=frozenset({"10.9.9.9"}))).block(["10.9.9.9"], 60, [])


def test_check_mode_reads_and_writes_nothing():
    fake = FakeNft()
    result = BlockTable(fake).block(["192.0.2.8", "2001:db8:1:2::99"], 60, [7000], check_mode=True)
    assert fake.scripts == [] and result["changed"] and not result["verified"]
    by_request = {e["requested"]: e for e in result["blocked"]}
    assert not by_request["192.0.2.8"]["already_blocked"]
    assert by_request["2001:db8:1:2::99"]["already_blocked"]  # its /64 holds it
    assert result["ports"] == ["5900-5999", "6012", "7000"]


def test_without_refresh_what_is_blocked_stays_as_it_is():
    fake = FakeNft()
    result = BlockTable(fake).block(["192.0.2.7"], 60, ["5900"], refresh=False)
    assert not result["changed"] and fake.scripts == []
    assert result["unchanged"] == [dict(result["unchanged"][0], network="192.0.2.7", expires_in=599)]


# -- full sets ----------------------------------------------------------------------------------

def small_ipv4_set(size: int) -> dict[str, str]:
    sets = dict(CURRENT)
    sets["blocked_ipv4"] = CURRENT["blocked_ipv4"].replace('"size": 65536', f'"size": {size}')
    return sets


def test_a_full_set_blocks_a_wider_network_in_the_same_transaction():
    fake = FakeNft(sets=small_ipv4_set(3))
    result = BlockTable(fake, set_size=3).block(["192.0.2.8", "192.0.2.9", "2001:db8::9"], 60, [])
    assert not result["set_full"] and result["not_blocked"] == [] and result["evicted"] == []
    # .7 (blocked before) and the two new ones go into their /24; .99 has no timeout: it stays
    assert result["widened"] == [{"network": "192.0.2.0/24", "set": "blocked_ipv4_p24",
                                  "covers": ["192.0.2.7", "192.0.2.8", "192.0.2.9"]}]
    by_request = {e["requested"]: e for e in result["blocked"]}
    assert by_request["192.0.2.9"] == dict(by_request["192.0.2.9"], network="192.0.2.0/24", set="blocked_ipv4_p24",
                                           already_blocked=False, timeout=60)
    lines = fake.writes()
    removal = ["add element inet virtguard blocked_ipv4 { 192.0.2.7 }",
               "delete element inet virtguard blocked_ipv4 { 192.0.2.7 }"]
    assert "\n".join(removal) in "\n".join(lines)
    assert not any("192.0.2.8" in line or "192.0.2.9" in line or "192.0.2.99" in line for line in lines)
    assert "add element inet virtguard blocked_ipv4_p24 { 192.0.2.0 timeout 60s }" in lines
    assert any(w.startswith("block sets of table inet virtguard full (3 elements each): wider networks blocked "
                            "instead: 192.0.2.0/24") for w in result["warnings"])


def test_a_full_set_with_no_wider_network_free_of_protected_ones_evicts_then_fails_naming_what_is_left_out():
    fake = FakeNft(sets=small_ipv4_set(3))
    full = r"^blocked_ipv4 is full \(3 elements\): 192\.0\.2\.10 not blocked$"
    with pytest.raises(SetFullError, match=full) as caught:
        BlockTable(fake, set_size=3).block(["192.0.2.8", "192.0.2.9", "192.0.2.10"], 60, [],
                                           protected=["192.0.2.128/25"])
    result = caught.value.result
    assert result["set_full"] and result["widened"] == []
    assert result["evicted"] == [{"network": "192.0.2.7", "set": "blocked_ipv4", "expires_in": 599}]
    assert result["not_blocked"] == [{"network": "192.0.2.10", "set": "blocked_ipv4"}]
    assert sorted(e["network"] for e in result["blocked"]) == ["192.0.2.8", "192.0.2.9"]
    lines = fake.writes()
    assert "delete element inet virtguard blocked_ipv4 { 192.0.2.7 }" in lines
    assert "add element inet virtguard blocked_ipv4 { 192.0.2.9 timeout 60s }" in lines
    assert not any("192.0.2.10" in line or "192.0.2.0" in line for line in lines)
    assert any("blocks lifted early: 192.0.2.7" in w for w in result["warnings"])


def test_protected_networks_are_checked_before_nft_runs():
    fake = FakeNft()
    with pytest.raises(NftablesError, match="^protected_networks: 'not-a-net'"):
        BlockTable(fake).block(["192.0.2.8"], 60, [], protected=["not-a-net"])
    assert fake.calls == []


def test_when_nft_says_full_after_all_the_run_waits_plans_again_and_in_the_end_writes_no_new_element():
    full = fixture("nft_set_full.stderr").replace("inet small", "inet virtguard")
    pauses: list[float] = []
    once = FakeNft(write_errors=[full])
    assert BlockTable(once, pause=pauses.append).block(["192.0.2.3"], 60, [])["verified"]
    assert pauses == [1.0] and len(once.scripts) == 2 and "192.0.2.3" in once.scripts[1]

    pauses.clear()
    fake = FakeNft(write_errors=[full] * 3)
    with pytest.raises(SetFullError, match="blocked_ipv4 is full") as caught:
        BlockTable(fake, pause=pauses.append).block(["192.0.2.7", "192.0.2.3", "2001:db8::9"], 60, [])
    assert pauses == [1.0, 1.0] and len(fake.scripts) == 4
    last = fake.scripts[-1]
    assert "192.0.2.3" not in last
    assert "2001:db8::9" in last and "192.0.2.7" in last  # the other family and the refresh still go in
    assert caught.value.result["not_blocked"] == [{"network": "192.0.2.3", "set": "blocked_ipv4"}]


def test_a_change_under_the_run_is_read_and_planned_again():
    fake = FakeNft(write_errors=["/dev/stdin:3:1-9: Error: Could not process rule: No such file or directory\n"])
    assert BlockTable(fake).block(["192.0.2.8"], 60, [])["verified"]
    assert len(fake.scripts) == 2


def test_other_nft_failures_are_errors():
    with pytest.raises(NftablesError, match="Operation not permitted"):
        BlockTable(FakeNft(write_errors=["Error: Operation not permitted\n"])).block(["192.0.2.8"], 60, [])
    with pytest.raises(NftablesError, match="list chains"):
        failing = BlockTable(lambda argv, data=None: (1, "", "netlink: Error: cache initialization failed"))
        failing.block(["192.0.2.8"], 60, [])


# -- migration ---------------------------------------------------------------------------------------

def test_a_0_1_0_table_is_migrated_in_the_blocking_transaction():
    fake = FakeNft(table="old", sets=OLD)
    result = BlockTable(fake, table="old").block(["10.0.0.1", "192.0.2.1"], 900, [])
    assert result["migrated"] == ["blocked_ipv4", "blocked_ipv6"]
    lines = fake.writes()
    flush = lines.index("flush chain inet old input")
    for name, kind in (("blocked_ipv4", "ipv4_addr"), ("blocked_ipv6", "ipv6_addr")):
        delete = lines.index(f"delete set inet old {name}")
        assert flush < delete < lines.index(f"add set inet old {name} {{ type {kind}; flags timeout; size 65536; }}")
        assert f"add rule inet old input jump {name}" in lines
    # carried over: the permanent element as it was, the IPv6 one with the time it had left;
    # re-blocked: the full new timeout
    assert "add element inet old blocked_ipv4 { 10.0.0.2 }" in lines
    assert "add element inet old blocked_ipv6 { ::a00:1 timeout 356s }" in lines
    assert "add element inet old blocked_ipv4 { 10.0.0.1 timeout 900s }" in lines
    assert "add element inet old blocked_ipv4 { 192.0.2.1 timeout 900s }" in lines
    assert [e["already_blocked"] for e in result["blocked"]] == [True, False]


def test_a_migrated_set_keeps_the_batch_first_and_the_longest_blocks():
    sets = dict(OLD)
    sets["blocked_ipv4"] = sets["blocked_ipv4"].replace(
        '"10.0.0.2"', '"10.0.0.2", {"elem": {"val": "10.0.0.3", "timeout": 600, "expires": 5}}')
    fake = FakeNft(table="old", sets=sets)
    # no wider network may be blocked here: the smaller set makes room by eviction
    table = BlockTable(fake, table="old", set_size=3)
    result = table.block(["192.0.2.1"], 60, [], protected=["10.0.0.0/16", "192.0.2.0/24"])
    added = [line for line in fake.writes() if line.startswith("add element inet old blocked_ipv4")]
    # room for 3: the batch, the permanent one, then the one with most time left (10.0.0.1: 599 s)
    assert sorted(added) == sorted(["add element inet old blocked_ipv4 { 192.0.2.1 timeout 60s }",
                                    "add element inet old blocked_ipv4 { 10.0.0.2 }",
                                    "add element inet old blocked_ipv4 { 10.0.0.1 timeout 599s }"])
    assert result["evicted"] == [{"network": "10.0.0.3", "set": "blocked_ipv4", "expires_in": 5}]


def test_a_block_refreshed_while_its_set_is_migrated_is_added_once_within_the_size():
    # 10.0.0.1 is blocked already: migrated with the batch's timeout, not also with the time it
    # had left (that would be 3 adds in a set of 2; mutation testing, issue 21)
    fake = FakeNft(table="old", sets=OLD)
    result = BlockTable(fake, table="old", set_size=2).block(["10.0.0.1"], 60, [])
    assert "blocked_ipv4" in result["migrated"]
    added = [line for line in fake.writes() if line.startswith("add element inet old blocked_ipv4")]
    assert sorted(added) == ["add element inet old blocked_ipv4 { 10.0.0.1 timeout 60s }",
                             "add element inet old blocked_ipv4 { 10.0.0.2 }"]
    assert [e["already_blocked"] for e in result["blocked"]] == [True] and result["evicted"] == []


# -- unblocking -----------------------------------------------------------------------------------

def test_unblock_removes_what_lies_inside_and_reports_what_a_wider_block_holds():
    fake = FakeNft()
    result = BlockTable(fake).unblock(["2001:db8::/64", "2001:db8:1:2::7", "192.0.2.7"])
    assert sorted(result["unblocked"]) == ["192.0.2.7", "2001:db8::5"]
    assert result["still_blocked"] == [{"network": "2001:db8:1:2::7", "blocked_by": "2001:db8:1:2::/64"}]
    assert "delete element inet virtguard blocked_ipv6 { 2001:db8::5 }" in fake.writes()


# -- results and messages, whole ----------------------------------------------------------------

def test_unblocking_removes_every_element_inside_and_reports_the_rest_whole():
    fake = FakeNft()
    result = BlockTable(fake).unblock(["192.0.2.0/24", "2001:db8:1:2::7", "2001:db8::5"])
    assert result == {"changed": True, "table": "inet virtguard",
                      "unblocked": ["192.0.2.7", "192.0.2.99", "2001:db8::5"],
                      "still_blocked": [{"network": "2001:db8:1:2::7", "blocked_by": "2001:db8:1:2::/64"}]}
    assert fake.writes() == [f"{verb} element inet virtguard {name} {{ {item} }}"
                             for name, item in (("blocked_ipv4", "192.0.2.7"), ("blocked_ipv4", "192.0.2.99"),
                                                ("blocked_ipv6", "2001:db8::5"))
                             for verb in ("add", "delete")]


def test_unblocking_nothing_blocked_writes_nothing_and_check_mode_writes_nothing_either():
    fake = FakeNft()
    assert BlockTable(fake).unblock(["203.0.113.9"]) == {
        "changed": False, "table": "inet virtguard", "unblocked": [], "still_blocked": []}
    assert BlockTable(fake).unblock(["192.0.2.7"], check_mode=True)["changed"] is True
    assert fake.scripts == []
    missing = FakeNft(sets={}, chains='{"nftables": []}')
    assert BlockTable(missing).unblock(["192.0.2.7"])["unblocked"] == []  # no set at all


def test_a_failed_unblock_names_nfts_error():
    fake = FakeNft(write_errors=["Error: Could not process rule: Operation not permitted\n"])
    with pytest.raises(NftablesError) as error:
        BlockTable(fake).unblock(["192.0.2.7"])
    assert str(error.value) == "nft -f - failed: Error: Could not process rule: Operation not permitted"


def test_an_element_missing_after_the_write_is_named_with_nfts_answer():
    with pytest.raises(NftablesError) as error:
        BlockTable(FakeNft(absent=frozenset({"10.9.9.9", "10.9.9.8"}))).block(["10.9.9.9", "10.9.9.8"], 60, [])
    asked = "get element inet virtguard blocked_ipv4 { 10.9.9.9, 10.9.9.8 }"
    assert str(error.value) == (
        f"10.9.9.9, 10.9.9.8 not in blocked_ipv4 after the update: /dev/stdin:1:1-{len(asked)}: Error: Could not "
        f"process rule: No such file or directory\n{asked}")


def test_the_block_result_names_the_table_and_the_set_size():
    result = BlockTable(FakeNft(), set_size=70000).block(["192.0.2.8"], 60, [])
    assert (result["table"], result["set_size"]) == ("inet virtguard", 70000)


@pytest.mark.parametrize(("ports", "added"), [
    (["5900"], None), (["5999"], None), (["5900-5999"], None), (["6012"], None),
    (["5899"], "5899"), (["6000"], "6000"), (["5950-6000"], "5950-6000"), (["5899-5900"], "5899-5900")])
def test_only_ports_the_set_does_not_hold_whole_are_added(ports, added):
    fake = FakeNft()
    result = BlockTable(fake).block(["192.0.2.7"], 60, ports, refresh=False)
    port_lines = [line for line in fake.writes() if line.startswith("add element inet virtguard console_ports")]
    assert port_lines == ([f"add element inet virtguard console_ports {{ {added} }}"] if added else [])
    assert result["changed"] is (added is not None)
