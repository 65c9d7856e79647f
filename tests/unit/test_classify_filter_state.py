"""The classify filter's state and its handling of one event (plugin_utils/classify_filter.py),
judged whole: the checked arguments reach the policy, the batches and the settings the
remediation runs get; wrong ones are named in whole messages; health events, errors, audit
numbering and identities reach the audit log as docs/rulebooks.md describes them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    DEFAULT_SET_SIZE,
    AddressError,
    parse_port_ranges,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.classify_filter import (
    LOGGER,
    FilterState,
    classify_event,
    source_uris,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.graphics_event import graphics_payload
from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import ArgumentError
from ansible_collections.virtguard.console.plugins.plugin_utils.rulebook_context import (
    FilterLoad,
    RulebookContextError,
)

PREFIX = "virtguard.console.classify: "


def graphics(phase: str = "connect", node: str = "198.51.100.7", sid: str = "s1",
             subject: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = graphics_payload(
        phase, "2025-01-01T00:00:00+00:00", {"uri": "qemu:///system", "hostname": "h"},
        {"name": "vm", "uuid": "u", "id": 1}, {"family": "ipv4", "node": "0.0.0.0", "service": "5901"},
        {"family": "ipv4", "node": node, "service": "40000"}, "none", subject or [],
        {"id": sid, "authenticated": phase != "connect"})
    return payload


def records(state: FilterState, path: Path) -> list[dict[str, Any]]:
    assert state.audit is not None
    assert state.audit.flush(10)
    return [json.loads(line) for line in path.read_text().splitlines()]


def close(state: FilterState) -> None:
    assert state.audit is not None
    state.audit.close()


def refused(raw: dict[str, Any]) -> str:
    with pytest.raises(ArgumentError) as error:
        FilterState.from_arguments(raw)
    return str(error.value)


def test_the_checked_arguments_reach_the_policy_the_batches_and_the_settings() -> None:
    state = FilterState.from_arguments({
        "trusted_networks": ["10.0.0.0/8"], "console_proxies": ["10.9.9.9"], "cut_untrusted": False,
        "block_seconds": 77, "ipv6_prefix": 48, "bruteforce_threshold": 4, "bruteforce_window": 9,
        "remediation_holdoff": 5, "max_batch": 3, "second_run_wait": 0.5, "nft_table": "vg_t",
        "block_set_size": 99, "block_scope": "fleet", "fleet_group": "hypervisors", "host_map": {"h": "kvm1"},
        "console_ports": ["5901", "5900"]})
    policy = state.policy
    assert (policy.block_seconds, policy.ipv6_prefix, policy.bruteforce_threshold, policy.bruteforce_window,
            policy.cut_untrusted) == (77, 48, 4, 9, False)
    assert [str(n) for n in policy.console_proxies] == ["10.9.9.9/32"]
    assert (state.batches.lease, state.batches.max_batch, state.batches.second_run_wait) == (5, 3, 0.5)
    assert state.classifier.batches is state.batches and state.classifier.remediating
    assert state.remediating is True
    assert state.run_hosts == "hypervisors"
    assert state.host_map == {"h": "kvm1"}
    assert state.console_ports == ["5900-5901"]
    assert state.settings == {"nft_table": "vg_t", "set_size": 99, "block_seconds": 77, "audit_log": "",
                              "scope": "fleet"}
    assert state.audit is None


def test_without_remediation_the_classifier_queues_nothing_and_a_hypervisor_scope_runs_on_the_target() -> None:
    state = FilterState.from_arguments({"trusted_networks": [], "remediation": False})
    assert state.remediating is False
    assert state.classifier.remediating is False and state.classifier.batches is not state.batches
    assert state.run_hosts is None
    # an untrusted session is still judged, and nothing is queued or sent for it
    out = classify_event(state, graphics(), 0.0)["virtguard"]
    assert (out["verdict"], out["remediate"], out["queued"]) == ("cut", False, False)
    assert "batch" not in out and "remediation" not in out  # with remediation on, the batch is sent at once


def test_wrong_arguments_are_named_in_whole_messages(tmp_path: Path) -> None:
    with pytest.raises(AddressError) as parse_error:
        parse_port_ranges(["59x"])
    assert refused({"console_ports": ["59x"]}) == f"{PREFIX}console_ports {parse_error.value}"
    assert refused({"nft_table": "bad name"}) == (
        f"{PREFIX}nft_table must be a letter then letters, digits or _ (at most 31), got 'bad name'")
    assert refused({"nft_table": "a" * 32}).startswith(f"{PREFIX}nft_table must be")
    assert FilterState.from_arguments({"nft_table": "a" + "_1" * 15}).settings["nft_table"] == "a" + "_1" * 15
    assert refused({"fleet_group": "-all"}) == (
        f"{PREFIX}fleet_group is not a usable inventory group name, got '-all'")
    assert FilterState.from_arguments({"fleet_group": "_kvm-1", "block_scope": "fleet"}).run_hosts == "_kvm-1"
    directory = tmp_path / "a directory"
    directory.mkdir()
    assert refused({"audit_log": str(directory)}).startswith(f"{PREFIX}audit_log cannot be used: ")


def test_the_audit_writer_has_the_fsync_policy_and_reports_in_the_filter_log(tmp_path: Path) -> None:
    state = FilterState.from_arguments({"audit_log": str(tmp_path / "audit.jsonl"), "audit_fsync": "always"})
    assert state.audit is not None
    assert state.audit.log.fsync == "always"
    assert state.audit.report is LOGGER
    assert state.settings["audit_log"] == str(tmp_path / "audit.jsonl")
    state.audit.close()


def test_untyped_identities_are_warned_of_word_for_word(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        FilterState.from_arguments({"allowed_identities": ["CN=a", "bob", {"sasl_username": "carol"}]})
    assert [record.getMessage() for record in caplog.records] == [
        "virtguard: virtguard.console.classify: allowed_identities entries without a type match a certificate "
        "DN or a SASL user name written exactly so, and will stop working in a later release; write them as "
        "{x509_dname: ...} or {sasl_username: ...} (docs/rulebooks.md): 'CN=a'; 'bob'"]


def test_records_are_numbered_in_the_order_submitted_and_carry_the_identities(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    state = FilterState.from_arguments({"trusted_networks": ["198.51.100.0/24"], "audit_log": str(path)})
    subject = [("x509dname", "CN=\u0430dmin"), ("saslUsername", "bob\ufffd")]
    for n in range(3):
        classify_event(state, graphics(sid=f"s{n}", subject=subject if n == 1 else None), float(n))
    written = records(state, path)
    assert [record["seq"] for record in written] == [0, 1, 2]
    assert "identities" not in written[0] and "identities" not in written[2]
    assert written[1]["identities"] == [
        {"type": "x509dname", "name": "CN=\u0430dmin", "escaped": "CN=\\u0430dmin", "replacement_characters": False},
        {"type": "saslUsername", "name": "bob\ufffd", "escaped": "bob\\ufffd", "replacement_characters": True}]
    close(state)


def test_a_record_loss_is_flagged_on_the_next_verdict_only(tmp_path: Path) -> None:
    state = FilterState.from_arguments({"trusted_networks": ["198.51.100.0/24"],
                                        "audit_log": str(tmp_path / "audit.jsonl")})
    assert state.audit is not None
    assert "audit_error" not in classify_event(state, graphics(sid="a"), 0)["virtguard"]
    state.audit.failed += 2  # as the writer counts records it could not write
    assert classify_event(state, graphics(sid="b"), 1)["virtguard"]["audit_error"] is True
    assert "audit_error" not in classify_event(state, graphics(sid="c"), 2)["virtguard"]
    assert state.audit_failed() is False
    state.audit.failed += 1
    assert state.audit_failed() is True and state.audit_failed() is False
    state.audit.close()
    assert FilterState.from_arguments({}).audit_failed() is False  # no audit log: never


def test_health_events_are_judged_and_audited_when_their_state_changed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    state = FilterState.from_arguments({"trusted_networks": [], "audit_log": str(path), "block_seconds": 60})
    changed = {"uri": "qemu+tls://kvm1/system", "state": "reconnecting", "previous": "connected", "changed": True}
    heartbeat = {"uri": "qemu+tls://kvm1/system", "state": "connected", "previous": "connected", "changed": False}
    out = classify_event(state, {"hypervisor": dict(changed)}, 5.0)
    assert out["virtguard"] == {"verdict": "health", "reasons": [], "remediate": False, "queued": False,
                                "state": "reconnecting", "previous": "connected", "changed": True,
                                "target_host": "kvm1", "block_seconds": 60}
    assert classify_event(state, {"hypervisor": dict(heartbeat)}, 6.0)["virtguard"]["state"] == "connected"
    written = records(state, path)
    assert [(r["record"], r["seq"], r["hypervisor"]) for r in written] == [("health", 0, changed)]
    assert written[0]["virtguard"]["state"] == "reconnecting"
    close(state)


def test_an_event_that_cannot_be_judged_gets_the_whole_error_verdict_and_is_audited(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    state = FilterState.from_arguments({"trusted_networks": [], "audit_log": str(path)})
    error = {"verdict": "error", "reasons": [], "remediate": False, "queued": False, "error": "AttributeError"}
    with caplog.at_level(logging.ERROR, logger=LOGGER.name):
        assert classify_event(state, {"hypervisor": "not a mapping"}, 0)["virtguard"] == error
        assert classify_event(state, {"graphics": {"remote": "not a mapping"}}, 0)["virtguard"]["verdict"] == "error"
    assert [record.getMessage() for record in caplog.records] == [
        "virtguard: cannot judge a health event", "virtguard: cannot judge a graphics event"]
    written = records(state, path)
    assert [(r["record"], r["virtguard"]["verdict"]) for r in written] == [("health", "error"), ("event", "error")]
    assert written[0]["hypervisor"] == "not a mapping"
    close(state)


def test_the_remediation_settings_are_the_batch_split_into_blocks_and_lone_cuts() -> None:
    state = FilterState.from_arguments({"trusted_networks": [], "console_ports": ["5900"], "nft_table": "vg_s",
                                        "block_seconds": 30})

    def entry(network: str, block: bool, address: str, client_port: int, console_port: int | None) -> dict[str, Any]:
        return {"network": network, "block": block, "address": address, "client_port": client_port,
                "console_port": console_port}

    batch = [entry("198.51.100.7/32", True, "198.51.100.7", 1, 5901),
             entry("198.51.100.7/32", True, "198.51.100.7", 2, 5900),
             entry("10.0.0.9/32", False, "10.0.0.9", 3, 5902),
             entry("2001:db8::/64", True, "2001:db8::1", 4, None)]
    assert state.remediation_settings(batch) == {
        "nft_table": "vg_s", "set_size": DEFAULT_SET_SIZE, "block_seconds": 30,
        "audit_log": "", "scope": "hypervisor",
        "networks": ["198.51.100.7/32", "2001:db8::/64"],
        "sessions": [{"address": "10.0.0.9", "client_port": 3, "console_port": 5902}],
        "console_ports": ["5900", "5901", "5902"],
        "protected_networks": []}


def test_the_source_uris_are_rendered_as_the_source_renders_them() -> None:
    def load(source_args: dict[str, Any], variables: dict[str, Any] | None = None) -> FilterLoad:
        return FilterLoad("virtguard.console.classify", {}, variables or {}, source_args)

    assert source_uris(load({})) == ["qemu:///system"]
    assert source_uris(load({"uri": "{{ u }}"}, {"u": "qemu+tls://kvm1/system"})) == ["qemu+tls://kvm1/system"]
    assert source_uris(load({"uri": ["qemu+tls://a/system", "qemu+ssh://b/system"]})) == [
        "qemu+tls://a/system", "qemu+ssh://b/system"]
    assert source_uris(load({"uri": None})) == []
    with pytest.raises(RulebookContextError) as error:
        source_uris(load({"uri": "{{ nowhere }}"}, {"other": 1}))
    assert str(error.value).startswith("virtguard.console.libvirt_graphics: uri (rulebook variable nowhere) ")
