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
