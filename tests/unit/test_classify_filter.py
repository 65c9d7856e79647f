"""The classify event filter: loaded by path as ansible-rulebook loads it, its arguments
checked once with names in the messages, its verdicts and batches, and its audit."""

from __future__ import annotations

import json
import math
import runpy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.classify_filter import OPTIONS, FilterState
from ansible_collections.virtguard.console.plugins.plugin_utils.graphics_event import graphics_payload
from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import ArgumentError
from ansible_collections.virtguard.console.plugins.plugin_utils.rulebook_context import RulebookContextError

FILTER = (Path(__file__).resolve().parents[2] / "build" / "collections" / "ansible_collections" / "virtguard"
          / "console" / "extensions" / "eda" / "plugins" / "event_filter" / "classify.py")
HOSTILE = "O=x,CN={{ lookup(*'pipe~touch /tmp/x'.split('~')) }}"


@pytest.fixture
def classify() -> dict[str, Any]:
    return runpy.run_path(str(FILTER))  # a fresh copy: fresh state, as per source


def event(phase: str = "connect", node: str = "192.0.2.7", service: str = "40000",
          subject: Iterable[tuple[str, str]] = (), uri: str = "qemu:///system", sid: str = "ab") -> dict[str, Any]:
    return graphics_payload(phase, "2025-01-01T00:00:00+00:00", {"uri": uri, "hostname": "h"},
                            {"name": "vm", "uuid": "u", "id": 1},
                            {"family": "ipv4", "node": "0.0.0.0", "service": "5901"},
                            {"family": "ipv4", "node": node, "service": service},
                            "none", list(subject), {"id": sid, "authenticated": phase != "connect"})


def audit_lines(path: Path, count: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().split("\n") if line][:count]


def test_adds_the_verdict_and_the_batch_limits_hosts_and_audits(classify, tmp_path):
    audit = tmp_path / "audit.jsonl"
    args = {"trusted_networks": ["10.0.0.0/8"], "audit_log": str(audit), "block_seconds": 30,
            "console_ports": [6100, "5700-5710"], "nft_table": "vg_t"}
    out = classify["main"](event(), **args)
    verdict = out["virtguard"]
    assert verdict["verdict"] == "cut" and verdict["remediate"] is True
    assert verdict["remote"] == {"family": "ipv4", "address": "192.0.2.7", "port": 40000, "trusted": False,
                                 "proxy": False, "network": "192.0.2.7/32"}
    assert verdict["batch"] == [{"session_id": "ab", "address": "192.0.2.7", "network": "192.0.2.7/32",
                                 "client_port": 40000, "console_port": 5901, "reasons": ["untrusted_network"],
                                 "block": True}]
    assert verdict["remediation"] == {"networks": ["192.0.2.7/32"], "sessions": [],
                                      "protected_networks": ["10.0.0.0/8"],
                                      "console_ports": ["5700-5710", "6100", "5901"],
                                      "nft_table": "vg_t", "set_size": 65536, "block_seconds": 30,
                                      "audit_log": str(audit), "scope": "hypervisor"}
    assert out["meta"]["hosts"] == "localhost"
    trusted = classify["main"](event(node="10.1.1.1", sid="cd"), **args)
    assert trusted["virtguard"]["verdict"] == "allow" and "meta" not in trusted
    queued = classify["main"](event(node="192.0.2.8", sid="ef"), **args)
    assert queued["virtguard"]["remediate"] is False and queued["virtguard"]["queued"] is True
    state = next(iter(classify["_STATES"].values()))
    assert state.audit.flush(10)
    records = audit_lines(audit, 3)
    assert [r["virtguard"]["verdict"] for r in records] == ["cut", "allow", "cut"]
    assert records[0]["graphics"] == event()["graphics"]


def test_fleet_scope_sends_every_run_to_the_fleet_group(classify):
    out = classify["main"](event(uri="qemu+tls://kvm2/system"), trusted_networks=["10.0.0.0/8"],
                           block_scope="fleet", fleet_group="hypervisors")
    assert out["meta"]["hosts"] == "hypervisors"
    assert out["virtguard"]["target_host"] == "kvm2" and out["virtguard"]["remediation"]["scope"] == "fleet"
    with pytest.raises(ArgumentError, match="fleet_group"):
        FilterState.from_arguments({"block_scope": "fleet", "fleet_group": "a,b"})
    with pytest.raises(ArgumentError, match="block_scope must be one of hypervisor, fleet"):
        FilterState.from_arguments({"block_scope": "everywhere"})


def test_hostile_identity_is_audited_literally_and_kept_out_of_the_verdict(classify, tmp_path):
    audit = tmp_path / "audit.jsonl"
    args = {"trusted_networks": ["10.0.0.0/8"], "allowed_identities": ["alice"], "audit_log": str(audit)}
    out = classify["main"](event("initialize", node="10.0.0.5", subject=[("x509dname", HOSTILE)]), **args)
    assert out["virtguard"]["reasons"] == ["identity_not_allowed"] and out["virtguard"]["remediate"]
    assert out["graphics"]["identity"]["x509dname"] == HOSTILE  # the payload contract is untouched
    assert "{{" not in json.dumps(out["virtguard"])
    next(iter(classify["_STATES"].values())).audit.flush(10)
    assert HOSTILE in audit.read_text()


def test_other_events_pass_unchanged(classify):
    assert classify["main"]({"i": 1}, trusted_networks=[]) == {"i": 1}


def test_an_event_that_cannot_be_judged_is_audited_and_never_raises(classify, tmp_path):
    audit = tmp_path / "audit.jsonl"
    broken = {"graphics": {"phase": "connect", "remote": "not a mapping", "session": 7}}
    out = classify["main"](broken, trusted_networks=[], audit_log=str(audit))
    assert out["virtguard"]["verdict"] == "error"
    unparsable = classify["main"](event(node="999.1.1.1"), trusted_networks=[], audit_log=str(audit))
    assert unparsable["virtguard"]["reasons"] == ["unparsable_address"]
    assert unparsable["virtguard"]["remediate"] is False
    next(iter(classify["_STATES"].values())).audit.flush(10)
    assert [r["virtguard"]["verdict"] for r in audit_lines(audit, 2)] == ["error", "cut"]


@pytest.mark.parametrize(("given", "message"), [
    ({"trusted_networks": "10.0.0.0/8,192.168.0.0/16"}, "trusted_networks (rulebook variable vg_nets) must be a list"),
    ({"trusted_networks": ["10.0.0.0/99"]}, "trusted_networks (rulebook variable vg_nets)"),
    ({"block_seconds": math.nan}, "block_seconds (rulebook variable vg_block) must be a finite number"),
    ({"block_seconds": 1e11}, "block_seconds (rulebook variable vg_block) must be at most"),
    ({"require_identity": "1"}, "require_identity must be true or false"),
    ({"console_ports": ["59x"]}, "console_ports"),
    ({"nft_table": "bad name"}, "nft_table"),
    ({"ipv6_prefix": 129}, "ipv6_prefix must be at most 128"),
    ({"host_map": {"kvm1": "bad name!"}}, "host_map"),
    ({"trusted_network": []}, "unknown argument(s) trusted_network"),
])
def test_wrong_arguments_are_refused_with_the_argument_and_variable_named(given, message):
    raw = {"trusted_networks": "{{ vg_nets }}", "block_seconds": "{{ vg_block | default(600) }}"}
    variables = {"vg_nets": ["10.0.0.0/8"]}
    for name, value in given.items():
        if name in ("trusted_networks", "block_seconds"):
            variables["vg_nets" if name == "trusted_networks" else "vg_block"] = value
        else:
            raw[name] = value
    with pytest.raises(ArgumentError) as error:
        FilterState.from_arguments(raw, variables)
    assert message in str(error.value)
    assert str(error.value).startswith("virtguard.console.classify: ")


def test_an_undefined_variable_is_named():
    with pytest.raises(RulebookContextError,
                       match=r"trusted_networks \(rulebook variable vg_nets\) cannot be rendered"):
        FilterState.from_arguments({"trusted_networks": "{{ vg_nets }}"}, {})


def test_a_symlink_at_the_audit_path_is_refused_at_start(tmp_path):
    (tmp_path / "target").write_text("")
    (tmp_path / "audit.jsonl").symlink_to(tmp_path / "target")
    with pytest.raises(ArgumentError, match="audit_log"):
        FilterState.from_arguments({"audit_log": str(tmp_path / "audit.jsonl")})
    assert (tmp_path / "target").read_text() == ""


def test_the_documentation_declares_exactly_the_checked_options(classify):
    import yaml
    documented = yaml.safe_load(classify["DOCUMENTATION"])["options"]
    assert sorted(documented) == sorted(option.name for option in OPTIONS)
    for option in OPTIONS:
        assert documented[option.name]["type"] == option.kind, option.name
        assert documented[option.name].get("default") == option.default, option.name


RULEBOOKS = Path(__file__).resolve().parents[2] / "extensions" / "eda" / "rulebooks"


def shipped_filter_arguments(rulebook: str) -> dict[str, Any]:
    import yaml

    [ruleset] = yaml.safe_load((RULEBOOKS / rulebook).read_text())
    [source] = ruleset["sources"]
    [classify_filter] = [f for f in source["filters"] if "virtguard.console.classify" in f]
    arguments: dict[str, Any] = classify_filter["virtguard.console.classify"]
    return arguments


def failed_ipv6_login(state: FilterState, node: str, sid: str, now: float) -> dict[str, Any]:
    """The verdict on a session from ``node`` that ended without initializing."""
    graphics = graphics_payload("disconnect", "2025-01-01T00:00:00+00:00", {"uri": "qemu:///system", "hostname": "h"},
                                {"name": "vm", "uuid": "u", "id": 1},
                                {"family": "ipv6", "node": "::", "service": "5901"},
                                {"family": "ipv6", "node": node, "service": "40000"}, "vnc", [],
                                {"id": sid, "authenticated": False})["graphics"]
    verdict: dict[str, Any] = state.classifier.classify(graphics, now)
    return verdict


def test_the_bruteforce_rulebook_keeps_blocks_off_the_trusted_networks_and_cuts_no_one_for_them():
    """The shipped bruteforce rulebook, with the trusted networks an operator gives to both
    rulebooks: an untrusted session is not cut there, and a brute force from a trusted
    admin's /64 blocks the attacking address, not the admin's prefix."""
    variables = {"virtguard_uri": "qemu:///system", "virtguard_bruteforce_threshold": 2}
    arguments = shipped_filter_arguments("bruteforce.yml")
    state = FilterState.from_arguments(arguments, dict(variables, virtguard_trusted_networks=["2001:db8:7:7::10/128"]))
    assert state.classifier.classify(event("connect", node="198.51.100.9")["graphics"], 0)["verdict"] == "allow"
    verdicts = [failed_ipv6_login(state, "2001:db8:7:7::66", f"a{n}", n) for n in range(2)]
    assert [v["verdict"] for v in verdicts] == ["allow", "block"]
    assert verdicts[-1]["batch"][0]["network"] == "2001:db8:7:7::66/128"
    # no trusted networks given: the attacker's /64, as before
    alone = FilterState.from_arguments(arguments, variables)
    verdicts = [failed_ipv6_login(alone, "2001:db8:7:7::66", f"b{n}", n) for n in range(2)]
    assert verdicts[-1]["batch"][0]["network"] == "2001:db8:7:7::/64"
