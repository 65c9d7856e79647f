"""The console policy's details (plugin_utils/console_policy.py), judged whole: its defaults,
the option each wrong setting is named under, ports at their bounds, what a verdict says of an
event with fields missing or a unix socket, brute force at thresholds 0 and 1 and the batch
entry it queues, and which networks the failure counter forgets first."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.console_policy import (
    Classifier,
    ConsolePolicy,
    FailedLogins,
    PolicyError,
    parse_port,
    target_host_for,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_batches import RemediationBatches


def test_the_policy_defaults() -> None:
    policy = ConsolePolicy()
    assert (policy.trusted_networks, policy.console_proxies, policy.host_map, policy.block_seconds,
            policy.ipv6_prefix, policy.bruteforce_threshold, policy.bruteforce_window, policy.cut_untrusted,
            policy.require_identity) == (None, [], {}, 600, 64, 0, 60, True, False)


@pytest.mark.parametrize(("kwargs", "option", "reason"), [
    ({"trusted_networks": ["10.0.0.0/33"]}, "trusted_networks",
     "'10.0.0.0/33' is not a network ('10.0.0.0/33' does not appear to be an IPv4 or IPv6 network)"),
    ({"console_proxies": ["proxy"]}, "console_proxies", "'proxy' is neither an IP address nor a network"),
    ({"require_identity": "maybe"}, "require_identity",
     "must be true or false, or x509, sasl or both, got str 'maybe'"),
    ({"allowed_identities": [{"sasl_username": ""}]}, "allowed_identities",
     "entry 1: sasl_username '': a SASL user name must be a non-empty string"),
    ({"host_map": {"kvm1": "bad name!"}}, "host_map", "'kvm1' -> 'bad name!' is not a usable inventory host name"),
])
def test_each_wrong_setting_is_named_under_its_own_option(kwargs: dict[str, Any], option: str, reason: str) -> None:
    with pytest.raises(PolicyError) as error:
        ConsolePolicy(**kwargs)
    assert (error.value.option, error.value.reason, str(error.value)) == (option, reason, f"{option}: {reason}")


def test_a_uri_whose_host_is_no_inventory_name_is_named_under_host_map() -> None:
    with pytest.raises(PolicyError) as error:
        target_host_for("qemu+tls://kvm_1!/system")
    assert (error.value.option, error.value.reason) == (
        "host_map", "target host 'kvm_1!' (for qemu+tls://kvm_1!/system) is not a usable inventory host name")
    assert target_host_for("qemu:///system") == "localhost"
    assert target_host_for("qemu+tls://kvm1/system", {"kvm1": "kvm1.example"}) == "kvm1.example"
    policy = ConsolePolicy(host_map={"qemu+tls://kvm1/system": "kvm-one"})
    assert Classifier(policy, None).target_of("qemu+tls://kvm1/system") == "kvm-one"


@pytest.mark.parametrize(("service", "port"), [
    ("0", None), ("1", 1), ("65535", 65535), ("65536", None), ("-1", None), ("5901x", None), ("", None), (5901, 5901)])
def test_ports_are_1_to_65535(service: Any, port: int | None) -> None:
    assert parse_port(service) == port


def test_an_event_with_fields_missing_is_judged_without_guessing() -> None:
    classifier = Classifier(ConsolePolicy(trusted_networks=["10.0.0.0/8"]), None)
    assert classifier.remediating is False and classifier.batches.lease == 0
    verdict = classifier.classify({"phase": "connect", "remote": {"family": "ipv4"}}, 0.0)
    assert verdict == {
        "verdict": "cut", "reasons": ["unparsable_address"], "remediate": False, "queued": False, "session_id": "",
        "phase": "connect", "protocol": "vnc", "primary": True, "snapshot": False,
        "remote": {"family": "unknown", "address": None, "port": None, "trusted": False, "proxy": False,
                   "network": None},
        "local_port": None, "target_host": "localhost", "block_seconds": 600}
    assert classifier.classify_health({}, 0.0)["target_host"] == "localhost"


def test_a_unix_socket_client_is_local_whatever_its_node_says() -> None:
    classifier = Classifier(ConsolePolicy(trusted_networks=["10.0.0.0/8"]), None)
    verdict = classifier.classify({"phase": "connect", "remote": {"family": "unix", "node": "192.0.2.7"}}, 0.0)
    assert (verdict["verdict"], verdict["remote"]) == ("allow", {
        "family": "unix", "address": None, "port": None, "trusted": None, "proxy": None, "network": None})


def failed_login(node: str = "192.0.2.7", service: str = "40000") -> dict[str, Any]:
    return {"phase": "disconnect", "hypervisor": {"uri": "qemu+tls://kvm1/system"},
            "remote": {"family": "ipv4", "node": node, "service": service}, "local": {"service": "5901"},
            "session": {"id": "s1", "authenticated": False, "primary": True, "channels": 0}}


def test_a_brute_force_threshold_of_0_is_off_and_of_1_blocks_at_the_first_failure() -> None:
    off = Classifier(ConsolePolicy(bruteforce_threshold=0), RemediationBatches(30))
    assert [off.classify(failed_login(), float(n))["verdict"] for n in range(5)] == ["allow"] * 5
    one = Classifier(ConsolePolicy(bruteforce_threshold=1), RemediationBatches(30))
    verdict = one.classify(failed_login(), 0.0)
    assert (verdict["verdict"], verdict["reasons"], verdict["remediate"]) == ("block", ["bruteforce"], True)
    [entry] = verdict["batch"]
    assert (entry["address"], entry["network"], entry["client_port"], entry["console_port"], entry["block"]) == (
        "192.0.2.7", "192.0.2.7/32", None, 5901, True)


def test_the_failure_counter_forgets_the_least_recently_failing_network_first() -> None:
    counter = FailedLogins(threshold=3, window=60, max_networks=2)
    for key in (("h", "a"), ("h", "b"), ("h", "a"), ("h", "c")):
        assert counter.failed(key, 0.0) is False
    assert list(counter.times) == [("h", "a"), ("h", "c")]
    assert len(counter) == 2
    assert counter.failed(("h", "a"), 1.0) is True and list(counter.times) == [("h", "c")]
