"""The console policy: networks, identities, verdicts, IPv6 prefixes, brute force, and the
offenders it queues for remediation in batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.console_policy import (
    Classifier,
    ConsolePolicy,
    FailedLogins,
    PolicyError,
    target_host_for,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.graphics_event import graphics_payload
from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_batches import RemediationBatches

URI = "qemu+ssh://root@kvm1/system"
DN_ALICE = "O=Example,CN=alice"


def graphics(phase: str = "connect", node: str = "192.0.2.7", family: str = "ipv4", service: str = "40000",
             subject: Iterable[tuple[str, str]] = (), snapshot: bool = False, authenticated: bool | None = None,
             uri: str = URI, session_id: str = "ab12", protocol: str = "vnc", primary: bool = True,
             channels: int | None = None) -> dict[str, Any]:
    session = {"id": session_id, "authenticated": phase != "connect" if authenticated is None else authenticated,
               "primary": primary, "channels": (0 if phase == "disconnect" else 1) if channels is None else channels}
    return graphics_payload(phase, "2025-01-01T00:00:00+00:00", {"uri": uri, "hostname": "kvm1"},
                            {"name": "vm", "uuid": "u", "id": 1},
                            {"family": "ipv4", "node": "0.0.0.0", "service": "5901"},
                            {"family": family, "node": node, "service": service},
                            "vencrypt+x509+sasl" if protocol == "vnc" else "", list(subject), session,
                            snapshot=snapshot, protocol=protocol)["graphics"]


def spice_client(classifier: Classifier, phases: list[tuple[str, str, int]], now: float = 0.0,
                 node: str = "192.0.2.7", authenticated: bool = True) -> list[dict[str, Any]]:
    """The verdicts of a SPICE client's channel events, as the source gives them: ``phases``
    holds (phase, channel, open channels after the event); channel "main" is the primary."""
    ports = {"main": "40000", "display": "40001", "inputs": "40002", "cursor": "40003"}
    return [classifier.classify(graphics(phase, node=node, service=ports[channel],
                                         protocol="spice", primary=channel == "main", channels=left,
                                         authenticated=authenticated if phase != "connect" or channel != "main"
                                         else False, session_id="5b1ce"), now)
            for phase, channel, left in phases]


HELD_SPICY = [("connect", "main", 1), ("initialize", "main", 1), ("connect", "display", 2),
              ("initialize", "display", 2), ("connect", "inputs", 3), ("initialize", "inputs", 3),
              ("connect", "cursor", 4), ("initialize", "cursor", 4)]


def classifier_for(policy: ConsolePolicy, lease: float = 30.0, second_run_wait: float = 0.5) -> Classifier:
    return Classifier(policy, RemediationBatches(lease, second_run_wait=second_run_wait))


def classify(policy: ConsolePolicy, event: dict[str, Any], now: float = 0.0) -> dict[str, Any]:
    return classifier_for(policy).classify(event, now)


def test_trusted_networks_match_ipv4_ipv6_and_ipv4_mapped_remotes():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8", "2001:db8::/32", "::ffff:172.16.0.0/108"])
    for node in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1", "172.16.0.9"):
        assert classify(policy, graphics(node=node, family="ipv6" if ":" in node else "ipv4"))["verdict"] == "allow"
    for node in ("192.0.2.7", "2001:db9::1", "::ffff:192.0.2.7", "::10.1.2.3"):
        verdict = classify(policy, graphics(node=node))
        assert verdict["verdict"] == "cut" and verdict["reasons"] == ["untrusted_network"], node


def test_ipv4_compatible_and_mapped_addresses_are_blocked_as_what_they_are_on_the_wire():
    policy = ConsolePolicy(trusted_networks=[], ipv6_prefix=64)
    mapped = classify(policy, graphics(node="::ffff:192.0.2.7", family="ipv6"))
    assert mapped["remote"]["address"] == "192.0.2.7" and mapped["remote"]["network"] == "192.0.2.7/32"
    # an IPv4-compatible address is an IPv6 address of its own; its /64 would hold ::1, so the
    # address alone is blocked
    compatible = classify(policy, graphics(node="::10.0.0.1", family="ipv6"))
    assert compatible["remote"]["family"] == "ipv6" and compatible["remote"]["network"] == "::a00:1/128"
    assert compatible["batch"][0]["network"] == "::a00:1/128"


def test_ipv6_clients_are_blocked_per_prefix_but_never_a_prefix_holding_a_trusted_address():
    policy = ConsolePolicy(trusted_networks=["2001:db8:0:1::10/128"], ipv6_prefix=64)
    assert classify(policy, graphics(node="2001:db8:0:2::7"))["remote"]["network"] == "2001:db8:0:2::/64"
    assert classify(policy, graphics(node="2001:db8:0:1::7"))["remote"]["network"] == "2001:db8:0:1::7/128"
    per_address = ConsolePolicy(trusted_networks=[], ipv6_prefix=128)
    assert classify(per_address, graphics(node="2001:db8::7"))["remote"]["network"] == "2001:db8::7/128"


def test_a_connect_from_outside_is_enough_and_snapshots_are_judged_alike():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8"])
    assert classify(policy, graphics("connect"))["remediate"] is True
    snapshot = classify(policy, graphics("initialize", snapshot=True))
    assert snapshot["verdict"] == "cut" and snapshot["snapshot"] is True and snapshot["remediate"] is True
    assert classify(policy, graphics("disconnect"))["verdict"] == "allow"  # nothing left to cut


def test_identity_rule():
    policy = ConsolePolicy(trusted_networks=["0.0.0.0/0"], allowed_identities=[DN_ALICE, "alice"])

    def init(*subject: tuple[str, str]) -> dict[str, Any]:
        return classify(policy, graphics("initialize", subject=subject))

    # every identity must be allowed: alice's certificate with mallory's login is not
    assert init(("x509dname", DN_ALICE), ("saslUsername", "mallory"))["reasons"] == ["identity_not_allowed"]
    assert init(("x509dname", DN_ALICE), ("saslUsername", "alice"))["verdict"] == "allow"
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


def test_a_storm_is_remediated_in_batches_and_no_session_is_left_covered():
    """500 offending sessions from 500 addresses in 2 s while a run is in flight: the first run
    has one, and the event that ends it sends all the rest; each session is in exactly one batch.
    (One run in flight: a second run beside a young one is tested in test_remediation_batches.)"""
    classifier = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8"]), second_run_wait=0)
    sent: list[list[str]] = []
    for n in range(500):
        verdict = classifier.classify(graphics(node=f"192.0.{n // 250}.{n % 250 + 1}", session_id=f"{n:x}"), n * 0.004)
        if verdict["remediate"]:
            sent.append([entry["session_id"] for entry in verdict["batch"]])
        else:
            assert verdict["queued"] is True
    assert sent == [["0"]]
    # the first run's cut comes back as its session's disconnect: that event sends the rest
    verdict = classifier.classify(graphics("disconnect", node="192.0.0.1", session_id="0"), 2.5)
    assert verdict["remediate"] is True
    assert [entry["session_id"] for entry in verdict["batch"]] == [f"{n:x}" for n in range(1, 500)]
    # another hypervisor host is not held by this one's run
    other = classifier.classify(graphics(uri="qemu+ssh://kvm2/system", session_id="ff"), 2.6)
    assert other["remediate"] is True and other["target_host"] == "kvm2"


def test_a_second_session_of_a_remediated_address_is_remediated_again():
    classifier = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8"]))
    assert classifier.classify(graphics(session_id="a1"), 0)["remediate"] is True
    classifier.classify(graphics("disconnect", session_id="a1"), 1)
    again = classifier.classify(graphics(session_id="a2", service="40001"), 2)
    assert again["remediate"] is True and again["batch"][0]["session_id"] == "a2"


def test_bruteforce_counts_sessions_that_never_initialized_within_the_window():
    policy = ConsolePolicy(bruteforce_threshold=3, bruteforce_window=10)
    classifier = classifier_for(policy)

    def failed(now: float, **kw: Any) -> dict[str, Any]:
        return classifier.classify(graphics("disconnect", authenticated=False, **kw), now)

    assert failed(0)["verdict"] == "allow"
    assert failed(1)["verdict"] == "allow"
    assert classifier.classify(graphics("disconnect", authenticated=True), 2)["verdict"] == "allow"
    assert failed(2, snapshot=True)["verdict"] == "allow"  # ended while we were away: not counted
    verdict = failed(3)
    assert verdict["verdict"] == "block" and verdict["reasons"] == ["bruteforce"] and verdict["remediate"]
    assert verdict["batch"][0]["network"] == "192.0.2.7/32" and verdict["batch"][0]["session_id"] == ""
    # the window is exactly bruteforce_window long: a failure that old no longer counts
    edge = classifier_for(policy)
    assert [edge.classify(graphics("disconnect", authenticated=False), t)["verdict"]
            for t in (0, 5, 10)] == ["allow", "allow", "allow"]
    assert edge.classify(graphics("disconnect", authenticated=False), 10.5)["verdict"] == "block"
    # a slow trickle stays under the threshold
    slow = classifier_for(policy)
    assert all(slow.classify(graphics("disconnect", authenticated=False), n * 6)["verdict"] == "allow"
               for n in range(10))


def test_bruteforce_from_a_rotating_ipv6_prefix_blocks_the_prefix():
    classifier = classifier_for(ConsolePolicy(bruteforce_threshold=5, bruteforce_window=60, ipv6_prefix=64))
    verdicts = [classifier.classify(graphics("disconnect", node=f"2001:db8:7:7::{n:x}", family="ipv6",
                                             authenticated=False, session_id=f"{n:x}"), n * 0.01)
                for n in range(1, 6)]
    assert [v["verdict"] for v in verdicts] == ["allow"] * 4 + ["block"]
    assert verdicts[-1]["batch"][0]["network"] == "2001:db8:7:7::/64"
    # the rotation goes on while the block lands: the /64 is not sent again within the lease
    more = [classifier.classify(graphics("disconnect", node=f"2001:db8:7:7::1:{n:x}", family="ipv6",
                                         authenticated=False, session_id=f"1{n:x}"), 1 + n * 0.01)
            for n in range(100)]
    assert not any(v["remediate"] for v in more)


def test_bruteforce_next_to_a_trusted_address_blocks_the_attacker_never_the_trusted_prefix():
    """The brute-force rulebook passes the trusted networks with cut_untrusted off: an attacker
    in the /64 of a trusted admin is blocked by address, and nobody is cut for being untrusted."""
    policy = ConsolePolicy(trusted_networks=["2001:db8:7:7::10/128"], cut_untrusted=False,
                           bruteforce_threshold=3, bruteforce_window=60, ipv6_prefix=64)
    classifier = classifier_for(policy)
    untrusted_connect = classifier.classify(graphics("connect", node="198.51.100.9", session_id="c1"), 0)
    assert untrusted_connect["verdict"] == "allow" and untrusted_connect["remote"]["trusted"] is False
    verdicts = [classifier.classify(graphics("disconnect", node="2001:db8:7:7::66", family="ipv6",
                                             authenticated=False, session_id=f"f{n}"), 1 + n) for n in range(3)]
    assert [v["verdict"] for v in verdicts] == ["allow", "allow", "block"]
    assert verdicts[-1]["batch"][0]["network"] == "2001:db8:7:7::66/128"
    # the same attack from a prefix with no trusted address in it blocks the prefix
    elsewhere = [classifier.classify(graphics("disconnect", node=f"2001:db8:9:9::{n + 1:x}", family="ipv6",
                                              authenticated=False, session_id=f"e{n}"), 10 + n) for n in range(3)]
    assert elsewhere[-1]["batch"][0]["network"] == "2001:db8:9:9::/64"


def test_failed_logins_are_bounded():
    failures = FailedLogins(threshold=3, window=60, max_networks=100)
    for n in range(10_000):
        failures.failed(("h", f"192.0.{n // 256}.{n % 256}/32"), n * 0.001)
    assert len(failures) == 100


def test_sessions_we_cut_are_not_failed_logins():
    policy = ConsolePolicy(trusted_networks=["10.0.0.0/8"], bruteforce_threshold=1)
    classifier = classifier_for(policy)
    assert classifier.classify(graphics("connect", session_id="aa"), 0)["verdict"] == "cut"
    assert classifier.classify(graphics("disconnect", session_id="aa", authenticated=False), 1)["verdict"] == "allow"


def test_without_remediation_verdicts_are_given_and_nothing_is_sent():
    classifier = Classifier(ConsolePolicy(trusted_networks=[]), None)
    verdict = classifier.classify(graphics(), 0)
    assert verdict["verdict"] == "cut" and verdict["remediate"] is False and verdict["queued"] is False


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
    ({"trusted_networks": ["nonsense"]}, "trusted_networks"),
    ({"host_map": {"kvm1": "{{ evil }}"}}, "host_map"),
])
def test_bad_configuration_is_refused_with_the_setting_named(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        ConsolePolicy(**kwargs)


def test_a_spice_client_gets_one_verdict_and_one_remediation():
    classifier = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8"]))
    verdicts = spice_client(classifier, HELD_SPICY)
    assert [v["verdict"] for v in verdicts] == ["cut", "cut"] + ["channel"] * 6
    assert [v["remediate"] for v in verdicts] == [True] + [False] * 7
    assert all(v["protocol"] == "spice" and v["primary"] is (n < 2) for n, v in enumerate(verdicts))
    assert all(v["reasons"] == [] for v in verdicts[2:])
    # the run is in flight until the client's last channel leaves (the main one may go first)
    ends = spice_client(classifier, [("disconnect", "main", 3), ("disconnect", "display", 2),
                                     ("disconnect", "inputs", 1)], now=1.0)
    assert classifier.batches.holds("kvm1", "5b1ce") and not any(v["remediate"] for v in ends)
    spice_client(classifier, [("disconnect", "cursor", 0)], now=1.1)
    assert not classifier.batches.holds("kvm1", "5b1ce") and not classifier.batches.in_flight("kvm1", 1.2)


def test_a_failed_spice_login_counts_once_per_attempt():
    """A wrong ticket: the main channel connects and leaves without initialize. A client that
    got in and opened channels is no failure, however its channels leave."""
    classifier = classifier_for(ConsolePolicy(bruteforce_threshold=3, bruteforce_window=60))
    attempt = [("connect", "main", 1), ("disconnect", "main", 0)]
    assert [v["verdict"] for v in spice_client(classifier, attempt, authenticated=False)] == ["allow", "allow"]
    assert [v["verdict"] for v in spice_client(classifier, attempt, now=1, authenticated=False)] == ["allow"] * 2
    session = HELD_SPICY + [("disconnect", "display", 3), ("disconnect", "inputs", 2), ("disconnect", "cursor", 1),
                            ("disconnect", "main", 0)]
    assert "block" not in [v["verdict"] for v in spice_client(classifier, session, now=2)]
    third = spice_client(classifier, attempt, now=3, authenticated=False)
    assert [v["verdict"] for v in third] == ["allow", "block"] and third[1]["reasons"] == ["bruteforce"]


def test_spice_sessions_carry_no_identity_and_have_their_own_reason_when_one_is_required():
    required = ConsolePolicy(trusted_networks=["192.0.2.0/24"], require_identity=True)
    verdict = classify(required, graphics("initialize", protocol="spice"))
    assert verdict["verdict"] == "cut" and verdict["reasons"] == ["spice_no_identity"]
    # a VNC session without identity keeps its reason
    assert classify(required, graphics("initialize"))["reasons"] == ["identity_missing"]
    # an allow-list of identities alone does not cut SPICE (there is nothing to compare)
    listed = ConsolePolicy(trusted_networks=["192.0.2.0/24"], allowed_identities=[DN_ALICE])
    assert classify(listed, graphics("initialize", protocol="spice"))["verdict"] == "allow"


# -- protected addresses (trusted, console proxies), login failures, domain ends, health ----------

PROXY = "127.0.0.1"


def failed_login(classifier: Classifier, node: str, sid: str, now: float, auth_scheme: str = "vnc",
                 ended_by: str | None = None) -> dict[str, Any]:
    """The verdict on a session from ``node`` that left before initialize."""
    event = graphics("disconnect", node=node, family="ipv6" if ":" in node else "ipv4", authenticated=False,
                     session_id=sid)
    event["auth_scheme"] = auth_scheme
    if ended_by is not None:
        event["session"]["ended_by"] = ended_by
    return classifier.classify(event, now)


def test_a_brute_force_from_a_trusted_or_proxy_address_is_reported_never_blocked():
    classifier = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8", "2001:db8:7::/48"],
                                              console_proxies=[PROXY], bruteforce_threshold=3, cut_untrusted=False))
    for node in ("10.1.2.3", PROXY, "2001:db8:7::5"):
        verdicts = [failed_login(classifier, node, f"{n:x}", n) for n in range(3)]
        assert [v["verdict"] for v in verdicts] == ["allow", "allow", "report"], node
        assert verdicts[-1]["reasons"] == ["bruteforce"] and all(v["failed_login"] for v in verdicts)
        assert not any(v["remediate"] or v["queued"] for v in verdicts), node
    assert classifier.batches.hosts == {}
    # an untrusted address beside them is blocked as before
    attacker = [failed_login(classifier, "192.0.2.9", f"b{n}", 10 + n) for n in range(3)]
    assert attacker[-1]["verdict"] == "block" and attacker[-1]["batch"][0]["network"] == "192.0.2.9/32"


def test_a_proxy_session_is_judged_by_identity_only_and_cut_alone():
    classifier = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8"], console_proxies=["127.0.0.0/30"],
                                              allowed_identities=["alice"]))
    connect = classifier.classify(graphics("connect", node="127.0.0.2", session_id="c1"), 0)
    assert connect["verdict"] == "allow" and connect["remote"]["proxy"] is True
    mallory = classifier.classify(graphics("initialize", node="127.0.0.2", service="41000", session_id="c1",
                                           subject=[("saslUsername", "mallory")]), 1)
    assert mallory["verdict"] == "cut" and mallory["reasons"] == ["identity_not_allowed"]
    assert mallory["batch"] == [{"session_id": "c1", "address": "127.0.0.2", "network": "127.0.0.2/32",
                                 "client_port": 41000, "console_port": 5901, "reasons": ["identity_not_allowed"],
                                 "block": False}]
    alice = classifier.classify(graphics("initialize", node="127.0.0.2", service="41001", session_id="c2",
                                         subject=[("saslUsername", "alice")]), 2)
    assert alice["verdict"] == "allow"


def test_a_trusted_session_failing_the_identity_policy_is_cut_alone_and_an_untrusted_one_blocked():
    classifier = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8"], allowed_identities=["alice"]))
    trusted = classifier.classify(graphics("initialize", node="10.0.0.9", session_id="t1",
                                           subject=[("saslUsername", "mallory")]), 0)
    assert trusted["batch"][0]["block"] is False
    untrusted = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8"])).classify(
        graphics("connect", node="192.0.2.1", session_id="u1"), 0)
    assert untrusted["batch"][0]["block"] is True


def test_a_proxy_address_is_never_inside_a_blocked_prefix():
    classifier = classifier_for(ConsolePolicy(trusted_networks=[], console_proxies=["2001:db8:1:1::80"]))
    verdict = classifier.classify(graphics("connect", node="2001:db8:1:1::66", family="ipv6"), 0)
    assert verdict["remote"]["network"] == "2001:db8:1:1::66/128"


def test_leaving_a_console_without_authentication_is_not_a_failed_login():
    classifier = classifier_for(ConsolePolicy(trusted_networks=[], bruteforce_threshold=2, cut_untrusted=False))
    # e.g. the clients QEMU drops when another takes the console exclusively (RFB shared-flag 0)
    verdicts = [failed_login(classifier, "192.0.2.5", f"{n:x}", n, auth_scheme="none") for n in range(4)]
    assert [v["failed_login"] for v in verdicts] == [False] * 4
    assert [v["verdict"] for v in verdicts] == ["allow"] * 4


def test_a_session_whose_domain_stopped_is_not_a_failed_login_and_ends_its_run():
    classifier = classifier_for(ConsolePolicy(trusted_networks=[], bruteforce_threshold=2))
    first = classifier.classify(graphics("connect", node="192.0.2.5", session_id="a1"), 0)
    assert first["remediate"] is True
    second = classifier.classify(graphics("connect", node="192.0.2.6", session_id="a2", uri=URI), 1)
    assert second["queued"] is True and not second["remediate"]
    # the first offender's domain is destroyed: its disconnect ends the run and sends the next
    gone = failed_login(classifier, "192.0.2.5", "a1", 2, ended_by="domain")
    assert gone["ended_by"] == "domain" and gone["failed_login"] is False
    assert gone["remediate"] is True and [o["session_id"] for o in gone["batch"]] == ["a2"]
    for n in range(3):
        assert failed_login(classifier, "192.0.2.7", f"d{n}", 3 + n, ended_by="domain")["verdict"] == "allow"


def test_health_events_send_a_due_retry_of_a_quiet_host():
    classifier = classifier_for(ConsolePolicy(trusted_networks=[]), lease=30)
    sent = classifier.classify(graphics("connect", node="192.0.2.5", session_id="a1"), 0)
    assert sent["remediate"] is True
    health = {"uri": URI, "hostname": "kvm1", "state": "connected", "previous": None, "changed": False}
    early = classifier.classify_health(health, 10)
    assert early["verdict"] == "health" and early["remediate"] is False and early["target_host"] == "kvm1"
    # the cut failed (no disconnect came back): the next health event after the holdoff retries it
    retry = classifier.classify_health(health, 31)
    assert retry["remediate"] is True and [o["session_id"] for o in retry["batch"]] == ["a1"]
    odd = classifier.classify_health({"uri": URI, "state": "{{ x }}", "previous": 3, "changed": "yes"}, 32)
    assert odd["state"] == "unknown" and odd["previous"] is None and odd["changed"] is False


def test_a_heartbeat_at_the_start_of_a_storm_sends_a_second_run_with_every_offender_waiting():
    """The first offender goes alone at its connect; the others arrive while its run is in flight.
    The host's next heartbeat (the source's busy heartbeat, 0.5 s after its graphics events)
    sends them all beside it; a console event in between does not, nor a change of state."""
    classifier = classifier_for(ConsolePolicy(trusted_networks=[]), second_run_wait=0.25)
    assert classifier.classify(graphics(node="192.0.2.1", session_id="a0"), 0.0)["remediate"] is True
    for n in range(1, 30):
        verdict = classifier.classify(graphics(node=f"192.0.2.{n + 1}", session_id=f"a{n:x}"), 0.01 * n)
        assert verdict["remediate"] is False and verdict["queued"] is True
    health = {"uri": URI, "hostname": "kvm1", "state": "connected", "previous": None, "changed": False}
    changed = classifier.classify_health(dict(health, changed=True, previous="connecting"), 0.45)
    assert changed["remediate"] is False, "a change of state is no clock"
    beat = classifier.classify_health(health, 0.5)
    assert beat["remediate"] is True and [o["session_id"] for o in beat["batch"]] == [f"a{n:x}" for n in range(1, 30)]
    # with one run in flight per host (second_run_wait 0), they wait for the first run's cut
    single = classifier_for(ConsolePolicy(trusted_networks=[]), second_run_wait=0)
    single.classify(graphics(node="192.0.2.1", session_id="a0"), 0.0)
    single.classify(graphics(node="192.0.2.2", session_id="a1"), 0.01)
    assert single.classify_health(health, 0.5)["remediate"] is False


def test_the_verdict_of_a_health_event_whole():
    """Every field of a health event's verdict, as rules and the audit read it (mutation testing,
    issue 21): the state and its previous one are passed on, checked against the states the
    source documents, and the block time is the policy's."""
    classifier = classifier_for(ConsolePolicy(trusted_networks=[], block_seconds=900))
    health = {"uri": URI, "hostname": "kvm1", "state": "resynchronised", "previous": "shedding", "changed": True}
    assert classifier.classify_health(health, 5.0) == {
        "verdict": "health", "reasons": [], "remediate": False, "queued": False, "state": "resynchronised",
        "previous": "shedding", "changed": True, "target_host": "kvm1", "block_seconds": 900}
    bare = classifier.classify_health({}, 6.0)  # a health event with nothing in it: no URI names a host
    assert (bare["state"], bare["previous"], bare["changed"], bare["target_host"]) == (
        "unknown", None, False, "localhost")


def test_the_verdict_of_a_console_event_whole():
    """Every field of a console event's verdict, as the rulebooks, the playbook and the audit read
    them (mutation testing, issue 21): an untrusted connect, a session on a unix socket (no
    address to judge), a phase and protocol the filter does not know, and the two ends of a
    session (by the client, by the domain)."""
    classifier = classifier_for(ConsolePolicy(trusted_networks=["10.0.0.0/8"]))
    offender = {"address": "192.0.2.7", "family": "ipv4", "network": "192.0.2.7/32", "port": 40000, "proxy": False,
                "trusted": False}
    common = {"block_seconds": 600, "local_port": 5901, "primary": True, "protocol": "vnc", "queued": False,
              "session_id": "ab12", "snapshot": False, "target_host": "kvm1"}
    assert classifier.classify(graphics(node="192.0.2.7"), 1.0) == {
        **common, "phase": "connect", "verdict": "cut", "reasons": ["untrusted_network"], "remediate": True,
        "remote": offender,
        "batch": [{"address": "192.0.2.7", "block": True, "client_port": 40000, "console_port": 5901,
                   "network": "192.0.2.7/32", "reasons": ["untrusted_network"], "session_id": "ab12"}]}
    assert classifier.classify(graphics("initialize", node="/run/console.sock", family="unix", service=""), 1.1) == {
        **common, "phase": "initialize", "verdict": "allow", "reasons": [], "remediate": False,
        "remote": {"address": None, "family": "unix", "network": None, "port": None, "proxy": None, "trusted": None}}
    assert classifier.classify(graphics("weird", protocol="rdp", node="10.1.1.1"), 1.2) == {
        **common, "phase": "unknown", "verdict": "allow", "reasons": [], "remediate": False,
        "remote": {"address": "10.1.1.1", "family": "ipv4", "network": "10.1.1.1/32", "port": 40000,
                   "proxy": False, "trusted": True}}
    by_client = classifier.classify(graphics("disconnect", node="192.0.2.8", session_id="cd34"), 2.0)
    by_domain_event = graphics("disconnect", node="192.0.2.7")
    by_domain_event["session"]["ended_by"] = "domain"
    by_domain = classifier.classify(by_domain_event, 2.1)
    assert (by_client["ended_by"], by_domain["ended_by"]) == ("client", "domain")
    assert by_domain == {**common, "phase": "disconnect", "verdict": "allow", "reasons": [], "remediate": False,
                         "remote": offender, "ended_by": "domain", "failed_login": False}
