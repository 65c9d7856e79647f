"""The nftables block: the transaction it writes, check mode, and (as root) the real thing."""

import json
import os
import shutil
import subprocess
import time

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.nftables_block import (
    RULE_COMMENT,
    BlockTable,
    NftablesError,
)


def real_run(argv, data=None):
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


class FakeNft:
    """Answers ``nft -j list table`` from a canned state and records scripts."""

    def __init__(self, state=None):
        self.state = state
        self.scripts = []

    def __call__(self, argv, data=None):
        if argv[:3] == ["nft", "-j", "list"]:
            if self.state is None:
                return 1, "", "Error: No such file or directory"
            return 0, json.dumps({"nftables": self.state}), ""
        self.scripts.append(data)
        return 0, "", ""


def test_refuses_bad_input_before_running_anything():
    fake = FakeNft()
    table = BlockTable(fake, table="t1")
    for addresses, ports, timeout in ((["1.2.3.4; flush ruleset"], ["5900"], 5), (["1.2.3.4"], ["59x"], 5),
                                      (["1.2.3.4"], ["5900"], 0), (["1.2.3.4"], [], 5)):
        with pytest.raises(NftablesError):
            table.block(addresses, timeout, ports)
    with pytest.raises(NftablesError):
        BlockTable(fake, table="bad name")
    assert fake.scripts == []


def test_check_mode_reports_and_writes_nothing():
    fake = FakeNft()
    result = BlockTable(fake, table="t1").block(["::ffff:192.0.2.7"], 60, ["5900-5999"], check_mode=True)
    assert result["changed"] and result["ruleset_created"]
    assert result["blocked"][0]["address"] == "192.0.2.7"  # mapped -> IPv4
    assert fake.scripts == []


def test_one_transaction_refreshes_the_timeout_of_an_existing_element():
    state = [
        {"table": {"family": "inet", "name": "t1"}},
        {"set": {"name": "console_ports", "elem": [{"range": [5900, 5999]}]}},
        {"set": {"name": "blocked_ipv4", "elem": [{"elem": {"val": "192.0.2.7", "timeout": 60, "expires": 3}}]}},
        {"set": {"name": "blocked_ipv6"}},
        {"chain": {"name": "input", "hook": "input"}},
        {"rule": {"chain": "input", "comment": RULE_COMMENT}},
        {"rule": {"chain": "input", "comment": RULE_COMMENT}},
    ]
    fake = FakeNft(state)
    table = BlockTable(fake, table="t1")
    table.verify_blocked = lambda addresses: None
    result = table.block(["192.0.2.7", "2001:db8::1"], 60, ["5901"])
    script = fake.scripts[0]
    assert "flush chain" not in script  # the rules are ours already
    assert ("add element inet t1 blocked_ipv4 { 192.0.2.7 }\n"
            "delete element inet t1 blocked_ipv4 { 192.0.2.7 }\n"
            "add element inet t1 blocked_ipv4 { 192.0.2.7 timeout 60s }") in script
    assert "add element inet t1 blocked_ipv6 { 2001:db8::1 timeout 60s }" in script
    assert result["blocked"][0]["already_blocked"] is True
    # without refresh, an existing element is left alone and nothing changes
    fake.scripts.clear()
    kept = table.block(["192.0.2.7"], 60, ["5901"], refresh=False)
    assert not kept["changed"] and kept["unchanged"][0]["expires_in"] == 3 and fake.scripts == []


needs_nft = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")


@needs_nft
def test_real_block_expires_by_itself_and_is_idempotent_in_structure():
    name = f"virtguard_u{os.getpid()}"
    table = BlockTable(real_run, table=name)
    try:
        first = table.block(["192.0.2.7", "2001:db8::7"], 2, ["5900-5999", "5901", "6100"])
        assert first["ruleset_created"]
        second = table.block(["192.0.2.8"], 2, ["5900-5999"])
        assert not second["ruleset_created"] and not second["rules_rewritten"]
        state = table.state()
        assert state["rules"] == [RULE_COMMENT, RULE_COMMENT]
        assert set(state["sets"]["blocked_ipv4"]) == {"192.0.2.7", "192.0.2.8"}
        assert (5900, 5999) in state["sets"]["console_ports"] and (6100, 6100) in state["sets"]["console_ports"]
        time.sleep(3)
        assert table.state()["sets"]["blocked_ipv4"] == {}
        assert table.unblock(["192.0.2.7"]) == {"changed": False, "table": f"inet {name}", "unblocked": []}
    finally:
        table.delete_table()
    assert table.state() is None
