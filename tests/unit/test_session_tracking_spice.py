"""Live SPICE grouping when an address already has an open session on a domain
(session_tracking): what QEMU says of a channel (``SpiceChannel``) decides, a main channel
always opens a session of its own, a known client's channel joins it, and the address's
session goes back to the older client when the newer one leaves first."""

from __future__ import annotations

from typing import Any

from ansible_collections.virtguard.console.plugins.plugin_utils.session_tracking import (
    SPICE_MAIN,
    PresentClient,
    SessionTracker,
    SpiceChannel,
)

LOCAL = {"family": "ipv4", "node": "0.0.0.0", "service": "5930"}
DOMAIN = {"name": "web", "uuid": "u-1", "id": 1}
OLD, NEW = 1111, -2222  # QEMU's connection-ids (signed 32-bit, as query-spice gives them)


def details(port: int, node: str = "192.0.2.7") -> Any:
    return (DOMAIN, LOCAL, {"family": "ipv4", "node": node, "service": str(port)}, "none", [])


def channel(tracker: SessionTracker, name: str, port: int, spice: SpiceChannel | None = None) -> dict[str, Any]:
    """A channel's connect (with what QEMU says of it) and initialize: the initialize's session."""
    tracker.observe(name, "connect", 1.0, details(port), "spice", spice)
    return tracker.observe(name, "initialize", 1.0, details(port), "spice")[1]


def test_a_main_channel_from_an_address_with_a_session_opens_a_session_of_its_own():
    tracker = SessionTracker()
    old = channel(tracker, "a-main", 40001)
    channel(tracker, "a-display", 40002, SpiceChannel(2, OLD))
    new = channel(tracker, "b-main", 40010, SpiceChannel(SPICE_MAIN, NEW))
    assert old["id"] == "a-main" and new["id"] == "b-main" and new["primary"] is True
    # the new client's channels join it, the old client's leave the old session
    assert channel(tracker, "b-display", 40011, SpiceChannel(2, NEW))["id"] == "b-main"
    assert channel(tracker, "a-cursor", 40003, SpiceChannel(3, OLD))["id"] == "a-main"
    ends = [tracker.observe(name, "disconnect", 2.0, details(port), "spice")[1]
            for name, port in (("a-display", 40002), ("a-cursor", 40003), ("a-main", 40001))]
    assert [(e["id"], e["primary"], e["channels"]) for e in ends] == [
        ("a-main", False, 2), ("a-main", False, 1), ("a-main", True, 0)]
    assert set(tracker.sessions) == {"b-main"} and tracker.spice_groups == {("u-1", "192.0.2.7"): "b-main"}


def test_without_an_answer_a_channel_joins_the_addresses_session():
    tracker = SessionTracker()
    channel(tracker, "a-main", 40001)
    assert channel(tracker, "x", 40009)["id"] == "a-main"


def test_the_address_goes_back_to_the_older_client_when_the_newer_leaves_first():
    tracker = SessionTracker()
    channel(tracker, "a-main", 40001)
    channel(tracker, "b-main", 40010, SpiceChannel(SPICE_MAIN, NEW))
    tracker.observe("b-main", "disconnect", 2.0, details(40010), "spice")
    assert tracker.spice_groups == {("u-1", "192.0.2.7"): "a-main"}
    assert channel(tracker, "late", 40020)["id"] == "a-main"
    for name, port in (("late", 40020), ("a-main", 40001)):
        tracker.observe(name, "disconnect", 3.0, details(port), "spice")
    assert not tracker.sessions and not tracker.spice_groups and not tracker.group_members
    assert not tracker.spice_connections


def test_a_snapshot_takes_the_channels_of_a_second_client_out_of_the_session_they_joined():
    # Unasked (no answer from QEMU), the second client's channels joined the address's session;
    # the snapshot tells the two clients apart. The first session, left to its live events (one
    # came since the snapshot was taken), keeps only its own channels, and each client's
    # main-channel disconnect ends its own session (mutation testing, issue 21).
    tracker = SessionTracker()
    channel(tracker, "a-main", 40001)
    channel(tracker, "a-display", 40002)
    assert channel(tracker, "b-main", 40010)["id"] == "a-main"
    assert channel(tracker, "b-display", 40011)["id"] == "a-main"
    present = {"a-main": PresentClient(details(40001), "spice", ["a-main", "a-display"]),
               "b-main": PresentClient(details(40010), "spice", ["b-main", "b-display"])}
    tracker.reconcile(present, 2.0, touched={"a-main"})
    assert tracker.sessions["a-main"].channels == {"a-main", "a-display"}
    assert tracker.sessions["b-main"].channels == {"b-main", "b-display"}
    ends = [tracker.observe(name, "disconnect", 3.0, details(port), "spice")[1]
            for name, port in (("a-display", 40002), ("a-main", 40001), ("b-display", 40011), ("b-main", 40010))]
    assert [(e["id"], e["primary"], e["channels"]) for e in ends] == [
        ("a-main", False, 1), ("a-main", True, 0), ("b-main", False, 1), ("b-main", True, 0)]
    assert not tracker.sessions and not tracker.channel_sessions and not tracker.spice_groups


def test_a_channel_the_source_never_saw_opening_ends_in_its_clients_session():
    tracker = SessionTracker()
    channel(tracker, "a-main", 40001)
    channel(tracker, "a-display", 40002)
    # a channel of the same client that opened before the source listened: its disconnect only
    assert tracker.observe("a-unseen", "disconnect", 2.0, details(40005), "spice") == (
        "a-main", {"id": "a-main", "authenticated": True, "primary": False, "channels": 2, "ended_by": "client"})
    assert tracker.sessions["a-main"].channels == {"a-main", "a-display"}
    # from another address or over VNC, nothing owns it: a session of its own, already over
    alone = {"id": "b-unseen", "authenticated": False, "primary": True, "channels": 0, "duration_s": None,
             "duration_exact": False, "ended_by": "client"}
    assert tracker.observe("b-unseen", "disconnect", 2.0, details(40005, "192.0.2.8"), "spice") == ("b-unseen", alone)
    assert tracker.observe("b-unseen", "disconnect", 2.0, details(40005), "vnc") == ("b-unseen", alone)


def test_durations_are_rounded_to_the_millisecond_and_a_domain_end_keeps_each_channels_addresses():
    tracker = SessionTracker()
    channel(tracker, "a-main", 40001)
    channel(tracker, "a-display", 40002)
    assert tracker.observe("a-display", "disconnect", 1.5, details(40002), "spice")[1] == {
        "id": "a-main", "authenticated": True, "primary": False, "channels": 1, "ended_by": "client"}
    assert tracker.observe("a-main", "disconnect", 2.23456, details(40001), "spice")[1]["duration_s"] == 1.235
    channel(tracker, "c-main", 40021)
    channel(tracker, "c-display", 40022)
    ended = tracker.end_domain("u-1", 3.0004)
    assert [(sid, m["primary"], m["channels"], m.get("duration_s"), d[2]["service"])
            for sid, m, d, _protocol in ended] == [
        ("c-main", False, 1, None, "40022"), ("c-main", True, 0, 2.0, "40021")]


def test_what_the_tracker_says_of_a_channel_and_of_a_group() -> None:
    tracker = SessionTracker()
    channel(tracker, "a-main", 40001)
    tracker.observe("v", "connect", 1.0, details(40100, "192.0.2.9"), "vnc")
    assert (tracker.protocol_of_channel("a-main"), tracker.protocol_of_channel("v")) == ("spice", "vnc")
    assert tracker.protocol_of_channel("nobody") is None
    assert tracker.channel_open("a-main") and not tracker.channel_open("nobody")
    assert tracker.spice_group_open("u-1", "192.0.2.7") and not tracker.spice_group_open("u-1", "192.0.2.9")
    tracker.observe("a-main", "disconnect", 2.0, details(40001), "spice")
    assert not tracker.channel_open("a-main") and not tracker.spice_group_open("u-1", "192.0.2.7")


def test_a_snapshot_opens_a_session_for_an_unknown_client_as_authenticated_and_grouped():
    tracker = SessionTracker()
    seen = (DOMAIN, LOCAL, {"family": "ipv4", "node": "192.0.2.7", "service": "40001"}, "sasl",
            [{"type": "saslUsername", "name": "bob"}])
    initialized, gone = tracker.reconcile({"s-main": PresentClient(seen, "spice", ["s-main", "s-display"])}, 5.0)
    assert initialized == [("s-main", {"id": "s-main", "authenticated": True, "primary": True, "channels": 2},
                            seen, "spice")]
    assert gone == [] and tracker.spice_groups == {("u-1", "192.0.2.7"): "s-main"}
    assert tracker.sessions["s-main"].authenticated is True
    # a later snapshot without the subject keeps the one it had
    bare: Any = (DOMAIN, LOCAL, seen[2], "sasl", [])
    initialized = tracker.reconcile({"s-main": PresentClient(bare, "spice", ["s-main", "s-display"])}, 6.0)[0]
    assert initialized[0][2] == seen
    # gone while the domain run still runs: ended by its client; duration to the snapshot, rounded
    gone = tracker.reconcile({}, 7.00049, running={"u-1": 1})[1]
    assert gone == [("s-main", {"id": "s-main", "authenticated": True, "primary": True, "channels": 0,
                                "duration_s": 2.0, "duration_exact": False, "ended_by": "client"}, seen, "spice")]
