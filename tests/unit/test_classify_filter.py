"""The classify event filter, loaded by path as ansible-rulebook loads it."""

import json
import runpy
import time
from pathlib import Path

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.graphics_event import graphics_payload

FILTER = (Path(__file__).resolve().parents[2] / "build" / "collections" / "ansible_collections" / "virtguard"
          / "console" / "extensions" / "eda" / "plugins" / "event_filter" / "classify.py")
HOSTILE = "O=x,CN={{ lookup(*'pipe~touch /tmp/x'.split('~')) }}"


@pytest.fixture
def classify():
    return runpy.run_path(str(FILTER))  # a fresh copy: fresh state, as per source


def event(phase="connect", node="192.0.2.7", service="40000", subject=(), uri="qemu:///system", sid="ab"):
    return graphics_payload(phase, "2025-01-01T00:00:00+00:00", {"uri": uri, "hostname": "h"},
                            {"name": "vm", "uuid": "u", "id": 1},
                            {"family": "ipv4", "node": "0.0.0.0", "service": "5901"},
                            {"family": "ipv4", "node": node, "service": service},
                            "none", list(subject), {"id": sid, "authenticated": phase != "connect"})


def test_adds_the_verdict_limits_hosts_and_audits(classify, tmp_path):
    audit = tmp_path / "audit.jsonl"
    args = {"trusted_networks": ["10.0.0.0/8"], "audit_log": str(audit), "block_seconds": 30}
    out = classify["main"](event(), **args)
    assert out["virtguard"]["verdict"] == "cut" and out["virtguard"]["remediate"] is True
    assert out["virtguard"]["remote"] == {"family": "ipv4", "address": "192.0.2.7", "port": 40000, "trusted": False}
    assert out["virtguard"]["local_port"] == 5901 and out["virtguard"]["block_seconds"] == 30
    assert out["meta"]["hosts"] == "localhost"
    trusted = classify["main"](event(node="10.1.1.1"), **args)
    assert trusted["virtguard"]["verdict"] == "allow" and "meta" not in trusted
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["virtguard"]["verdict"] for r in records] == ["cut", "allow"]
    assert records[0]["graphics"] == event()["graphics"]


def test_hostile_identity_is_audited_literally_and_kept_out_of_the_verdict(classify, tmp_path):
    audit = tmp_path / "audit.jsonl"
    out = classify["main"](event("initialize", node="10.0.0.5", subject=[("x509dname", HOSTILE)]),
                           trusted_networks=["10.0.0.0/8"], allowed_identities=["alice"], audit_log=str(audit))
    assert out["virtguard"]["reasons"] == ["identity_not_allowed"] and out["virtguard"]["remediate"]
    assert out["graphics"]["identity"]["x509dname"] == HOSTILE  # the payload contract is untouched
    assert "{{" not in json.dumps(out["virtguard"])
    assert HOSTILE in audit.read_text()


def test_other_events_pass_unchanged(classify):
    assert classify["main"]({"i": 1}, trusted_networks=[]) == {"i": 1}


def test_configuration_errors_are_loud(classify):
    with pytest.raises(ValueError, match="unknown argument"):
        classify["main"](event(), trusted_network=["10.0.0.0/8"])
    with pytest.raises(ValueError, match="trusted_networks"):
        classify["main"](event(), trusted_networks=["10.0.0.0/99"])


def test_arguments_may_refer_to_rulebook_variables(classify):
    variables = {"virtguard_trusted_networks": ["10.0.0.0/8"], "virtguard_block_seconds": 45}
    rendered = classify["render_arguments"]({
        "trusted_networks": "{{ virtguard_trusted_networks }}",
        "block_seconds": "{{ virtguard_block_seconds | default(600) }}",
        "require_identity": "{{ virtguard_require_identity | default(false) }}",
        "audit_log": "{{ virtguard_audit_log | default('') }}",
    }, variables)
    assert rendered == {"trusted_networks": ["10.0.0.0/8"], "block_seconds": 45,
                        "require_identity": False, "audit_log": ""}
    assert classify["activation_variables"]() is None  # not inside ansible-rulebook
    with pytest.raises(ValueError, match="activation variables"):
        classify["main"](event(), trusted_networks="{{ virtguard_trusted_networks }}")


def test_an_audit_failure_marks_the_event_and_never_stops_the_stream(classify, tmp_path):
    out = classify["main"](event(), trusted_networks=[], audit_log=str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert out["virtguard"]["audit_error"] is True and out["virtguard"]["remediate"] is True


def test_storm_keeps_up_and_remediates_once(classify, tmp_path):
    """Thousands of events per second through policy and audit, one remediation."""
    audit = tmp_path / "audit.jsonl"
    args = {"trusted_networks": ["10.0.0.0/8"], "audit_log": str(audit)}
    events = [event(service=str(20000 + n), sid="%x" % n) for n in range(20000)]
    started = time.perf_counter()
    verdicts = [classify["main"](e, **args)["virtguard"] for e in events]
    rate = len(events) / (time.perf_counter() - started)
    print(f"classify + audit: {rate:.0f} events/s")
    assert rate > 2000
    assert [v["remediate"] for v in verdicts].count(True) == 1
    assert len(audit.read_text().splitlines()) == 20000
