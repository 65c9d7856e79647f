"""The console policy: networks, identities, verdicts, storm hold-off, brute force."""

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.console_policy import (
    Classifier,
    ConsolePolicy,
    PolicyError,
    normalize_address,
    parse_port_ranges,
    target_host_for,
)
from ansible_collections.virtguard.console.plugins.module_utils.graphics_event import graphics_payload

URI = "qemu+ssh://root@kvm1/system"
DN_ALICE = "O=Example,CN=alice"


def graphics(phase="connect", node="192.0.2.7", family="ipv4", service="40000", subject=(),
             snapshot=False, authenticated=None, uri=URI, session_id="ab12"):
    session = {"id": session_id, "authenticated": phase != "connect" if authenticated is None else authenticated}
    return graphics_payload(phase, "2025-01-01T00:00:00+00:00", {"uri": uri, "hostname": "kvm1"},
                            {"name": "vm", "uuid": "u", "id": 1},
                            {"family": "ipv4", "node": "0.0.0.0", "service": "5901"},
                            {"family": family, "node": node, "service": service},
                            "vencrypt+x509+sasl", list(subject), session, snapshot=snapshot)["graphics"]


def classify(policy, event, now=0.0, classifier=None):
    return (classifier or Classifier(policy)).classify(event, now)


@pytest.mark.parametrize("node, expected", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8::7", "2001:db8::7"),
    ("fe80::1%eth0", "fe80::1"),
    ("not-an-address", None),
    ("", None),
])
def test_addresses_are_normalised(node, expected):
    address = normalize_address(node)
    assert (str(address) if address else None) == expected


def test_trusted_networks_match_ipv4_ipv6_and_ipv4_mapped_remotes():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8", "2001:db8::/32", "::ffff:172.16.0.0/108"])
    for node in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1", "172.16.0.9"):
        assert classify(policy, graphics(node=node, family="ipv6" if ":" in node else "ipv4"))["verdict"] == "allow"
    for node in ("192.0.2.7", "2001:db9::1", "::ffff:192.0.2.7"):
        verdict = classify(policy, graphics(node=node))
        assert verdict["verdict"] == "cut" and verdict["reasons"] == ["untrusted_network"]


def test_a_connect_from_outside_is_enough_and_snapshots_are_judged_alike():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8"])
    assert classify(policy, graphics("connect"))["remediate"] is True
    snapshot = classify(policy, graphics("initialize", snapshot=True))
    assert snapshot["verdict"] == "cut" and snapshot["snapshot"] is True
    assert classify(policy, graphics("disconnect"))["verdict"] == "allow"  # nothing left to cut


def test_identity_rule():
    policy = ConsolePolicy(trusted_networks=["0.0.0.0/0"], allowed_identities=[DN_ALICE, "alice"])

    def init(*subject):
        return classify(policy, graphics("initialize", subject=subject))

    assert init(("x509dname", DN_ALICE), ("saslUsername", "mallory"))["verdict"] == "allow"  # one is enough
    assert init(("saslUsername", "alice"))["verdict"] == "allow"
    assert init(("saslUsername", "mallory"))["reasons"] == ["identity_not_allowed"]
    assert init(("x509dname", "O=Example,CN=Alice"))["reasons"] == ["identity_not_allowed"]  # exact match
    assert init()["verdict"] == "allow"  # no identity: allowed by default
    strict = ConsolePolicy(trusted_networks=["0.0.0.0/0"], require_identity=True)
    assert classify(strict, graphics("initialize"))["reasons"] == ["identity_missing"]
    assert classify(strict, graphics("connect"))["verdict"] == "allow"  # no identity before TLS
    assert classify(strict, graphics("initialize", subject=[("saslUsername", "x")]))["verdict"] == "allow"


def test_both_rules_give_both_reasons():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8"], allowed_identities=["alice"])
    verdict = classify(policy, graphics("initialize", subject=[("saslUsername", "eve")]))
    assert verdict["reasons"] == ["untrusted_network", "identity_not_allowed"]


def test_no_network_rule_without_trusted_networks_and_unix_sockets_are_local():
    assert classify(ConsolePolicy(), graphics())["verdict"] == "allow"
    assert classify(ConsolePolicy(trusted_networks=[]), graphics())["verdict"] == "cut"
    unix = classify(ConsolePolicy(trusted_networks=[]), graphics(node="", family="unix", service=""))
    assert unix["verdict"] == "allow" and unix["remote"]["family"] == "unix"


def test_unparsable_address_is_cut_but_cannot_be_remediated():
    verdict = classify(ConsolePolicy(trusted_networks=["0.0.0.0/0"]), graphics(node="garbage"))
    assert verdict["reasons"] == ["unparsable_address"] and verdict["remediate"] is False


def test_verdict_never_holds_client_text():
    hostile = "{{ lookup('pipe', 'id') }}"
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8"], allowed_identities=["alice"])
    verdict = classify(policy, graphics("initialize", subject=[("x509dname", hostile), ("saslUsername", hostile)],
                                        session_id="{{ x }}"))
    assert "{{" not in repr(verdict)
    assert verdict["session_id"] == ""


def test_a_storm_from_one_address_is_one_remediation_per_holdoff():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8"], remediation_holdoff=30, block_seconds=600)
    classifier = Classifier(policy)
    verdicts = [classifier.classify(graphics(service=str(40000 + n), session_id="%x" % n), now=n * 0.01)
                for n in range(500)]
    assert [v["remediate"] for v in verdicts].count(True) == 1
    assert all(v["covered_by"] == "0" for v in verdicts[1:])
    # another address, or another hypervisor host, is its own remediation
    assert classifier.classify(graphics(node="192.0.2.8"), now=5)["remediate"] is True
    assert classifier.classify(graphics(uri="qemu+ssh://kvm2/system"), now=5)["remediate"] is True
    # after the hold-off (a failed run heals itself), the next event remediates again
    assert classifier.classify(graphics(), now=31)["remediate"] is True


def test_holdoff_never_outlasts_the_block():
    assert ConsolePolicy(block_seconds=10, remediation_holdoff=60).remediation_holdoff == 10


def test_bruteforce_counts_sessions_that_never_initialized_within_the_window():
    policy = ConsolePolicy(bruteforce_threshold=3, bruteforce_window=10)
    classifier = Classifier(policy)

    def failed(now, **kw):
        return classifier.classify(graphics("disconnect", authenticated=False, **kw), now)

    assert failed(0)["verdict"] == "allow"
    assert failed(1)["verdict"] == "allow"
    assert classifier.classify(graphics("disconnect", authenticated=True), 2)["verdict"] == "allow"
    assert failed(2, snapshot=True)["verdict"] == "allow"  # ended while we were away: not counted
    verdict = failed(3)
    assert verdict["verdict"] == "block" and verdict["reasons"] == ["bruteforce"] and verdict["remediate"]
    # a slow trickle stays under the threshold
    slow = Classifier(policy)
    assert all(slow.classify(graphics("disconnect", authenticated=False), n * 6)["verdict"] == "allow"
               for n in range(10))


def test_sessions_we_cut_are_not_failed_logins():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8"], bruteforce_threshold=1)
    classifier = Classifier(policy)
    assert classifier.classify(graphics("connect", session_id="aa"), 0)["verdict"] == "cut"
    assert classifier.classify(graphics("disconnect", session_id="aa", authenticated=False), 1)["verdict"] == "allow"


@pytest.mark.parametrize("uri, host_map, expected", [
    ("qemu+ssh://root@kvm1/system", {}, "kvm1"),
    ("qemu+tls://kvm2.example.com/system", {}, "kvm2.example.com"),
    ("qemu+tls://[2001:db8::5]/system", {}, "2001:db8::5"),
    ("qemu:///system", {}, "localhost"),
    ("qemu+unix:///session?socket=/run/x/libvirt-sock", {}, "localhost"),
    ("qemu+ssh://root@kvm1/system", {"kvm1": "hv-one"}, "hv-one"),
    ("qemu:///system", {"qemu:///system": "this-host"}, "this-host"),
])
def test_target_host(uri, host_map, expected):
    assert target_host_for(uri, host_map) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"trusted_networks": ["10.0.0.0/33"]}, "trusted_networks"),
    ({"trusted_networks": "nonsense"}, "trusted_networks"),
    ({"require_identity": "maybe"}, "require_identity"),
    ({"host_map": {"kvm1": "{{ evil }}"}}, "host_map"),
    ({"block_seconds": 0}, "block_seconds"),
    ({"bruteforce_window": "x"}, "bruteforce_window"),
])
def test_bad_configuration_is_refused_with_the_setting_named(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        ConsolePolicy(**kwargs)


def test_port_ranges():
    assert parse_port_ranges([5900, "5900-5999", " 6000 "]) == [(5900, 5900), (5900, 5999), (6000, 6000)]
    for bad in ("0", "5999-5900", "59x", "70000"):
        with pytest.raises(PolicyError):
            parse_port_ranges([bad])
