"""The libvirt-to-payload mapping and session tracking (pure logic)."""

from __future__ import annotations

from typing import Any

from ansible_collections.virtguard.console.plugins.module_utils import graphics_event as ge
from ansible_collections.virtguard.console.plugins.module_utils.session_tracking import SessionTracker

REMOTE = {"family": "ipv4", "node": "192.0.2.7", "service": "40000"}


def test_names_and_addresses():
    assert [ge.phase_name(n) for n in (0, 1, 2, 9)] == ["connect", "initialize", "disconnect", "unknown-9"]
    assert ge.address({"family": 1, "node": "::1", "service": "5900"}) == {"family": "ipv6", "node": "::1",
                                                                           "service": "5900"}
    assert ge.identity_key("saslUsername") == "sasl_username"
    assert ge.identity_key("x509dname") == "x509dname"


def test_identity_is_flattened_in_order_and_kept_verbatim():
    hostile = "CN={{ lookup('pipe', 'id') }}\\, O=x"
    subject = [("x509dname", hostile), ("saslUsername", "bob"), ("saslUsername", "other")]
    assert ge.subject_list(subject) == [{"type": "x509dname", "name": hostile}, {"type": "saslUsername", "name": "bob"},
                                        {"type": "saslUsername", "name": "other"}]
    assert ge.identity_from_subject(subject) == {"x509dname": hostile, "sasl_username": "bob"}
    assert ge.identity_from_subject([]) == {}


def test_session_id_depends_only_on_where_the_session_is():
    one = ge.session_id_for("qemu:///system", "u-1", REMOTE)
    assert one == ge.session_id_for("qemu:///system", "u-1", dict(REMOTE))
    assert one != ge.session_id_for("qemu:///system", "u-1", dict(REMOTE, service="40001"))
    assert one != ge.session_id_for("qemu:///system", "u-2", REMOTE)
    assert one != ge.session_id_for("qemu+tls://h/system", "u-1", REMOTE)


def test_query_vnc_clients():
    answer = {"enabled": True, "auth": "vencrypt+x509+sasl", "family": "ipv4", "host": "0.0.0.0", "service": "5901",
              "clients": [{"family": "ipv6", "host": "::ffff:192.0.2.1", "service": "41000", "websocket": False,
                           "x509_dname": "CN=a", "sasl_username": "alice"},
                          {"family": "ipv4", "host": "192.0.2.2", "service": "41001", "websocket": False}]}
    [(local, remote, auth, subject), second] = ge.clients_from_query_vnc(answer)
    bare = second[3]
    assert local == {"family": "ipv4", "node": "0.0.0.0", "service": "5901"}
    assert remote == {"family": "ipv6", "node": "::ffff:192.0.2.1", "service": "41000"}
    assert auth == "vencrypt+x509+sasl"
    assert subject == [("x509dname", "CN=a"), ("saslUsername", "alice")] and bare == []
    assert ge.clients_from_query_vnc({"enabled": False}) == []


def test_query_spice_channels():
    answer = {"enabled": True, "auth": "spice", "host": "0.0.0.0", "port": 5930, "tls-port": 5931,
              "channels": [{"family": "ipv4", "host": "192.0.2.3", "port": "42000", "tls": True}]}
    [(local, remote, auth, subject)] = ge.clients_from_query_spice(answer)
    assert local["service"] == "5931" and remote == {"family": "ipv4", "node": "192.0.2.3", "service": "42000"}
    assert auth == "spice" and subject == []


def details(subject=()):
    return ({"name": "d"}, {}, REMOTE, "none", list(subject))


def test_tracker_live_session():
    tracker = SessionTracker()
    assert tracker.observe("s", "connect", 10.0, details()) == {"id": "s", "authenticated": False}
    assert tracker.observe("s", "initialize", 10.5, details()) == {"id": "s", "authenticated": True}
    assert tracker.observe("s", "disconnect", 12.25, details()) == {"id": "s", "authenticated": True,
                                                                    "duration_s": 2.25, "duration_exact": True}
    assert len(tracker) == 0


def test_tracker_failed_authentication_and_unknown_disconnects():
    tracker = SessionTracker()
    tracker.observe("s", "connect", 1.0, details())
    assert tracker.observe("s", "disconnect", 2.0, details())["authenticated"] is False
    assert tracker.observe("u", "disconnect", 3.0, details([("saslUsername", "x")])) == {
        "id": "u", "authenticated": True, "duration_s": None, "duration_exact": False}


def test_reconcile_reports_present_and_gone_but_leaves_touched_sessions_to_live_events():
    tracker = SessionTracker()
    tracker.observe("stays", "connect", 1.0, details())
    tracker.observe("gone", "connect", 1.0, details())
    tracker.observe("live-new", "connect", 5.0, details())
    present = {"stays": details(), "new": details([("saslUsername", "a")]), "ended-live": details()}
    initialized, gone = tracker.reconcile(present, 6.0, touched={"ended-live", "live-new"})
    assert [entry[0] for entry in initialized] == ["stays", "new"]
    assert all(entry[1]["authenticated"] for entry in initialized)
    assert [(entry[0], entry[1]["duration_s"], entry[1]["duration_exact"]) for entry in gone] == [("gone", 5.0, False)]
    assert set(tracker.sessions) == {"stays", "new", "live-new"}


def test_a_duration_is_exact_only_when_the_source_saw_the_session_begin_and_end():
    tracker = SessionTracker()
    tracker.observe("live", "connect", 1.0, details())
    tracker.observe("missed-connect", "initialize", 1.0, details())  # the source started after its connect
    tracker.reconcile({"live": details(), "missed-connect": details(), "from-snapshot": details()}, 2.0)
    ends = {sid: tracker.observe(sid, "disconnect", 4.0, details())
            for sid in ("live", "missed-connect", "from-snapshot")}
    assert {sid: (end["duration_s"], end["duration_exact"]) for sid, end in ends.items()} == {
        "live": (3.0, True),  # both ends seen
        "missed-connect": (3.0, False),  # began before 1.0: a lower bound
        "from-snapshot": (2.0, False),  # began before the snapshot at 2.0: a lower bound
    }


def test_a_disconnect_found_by_a_snapshot_is_an_upper_bound():
    """The session ended while the source was not connected: at some moment before the
    snapshot, which is all the source knows (issue: 58.7 s reported for a 9 s session)."""
    tracker = SessionTracker()
    tracker.observe("s", "connect", 10.0, details())
    tracker.observe("s", "initialize", 10.5, details())
    _initialized, [(session_id, session, _details)] = tracker.reconcile({}, 68.7)
    assert session_id == "s"
    assert session == {"id": "s", "authenticated": True, "duration_s": 58.7, "duration_exact": False}


async def test_the_payload_of_a_disconnect_found_by_a_snapshot_says_its_duration_is_not_exact():
    import asyncio

    from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import Snapshot
    from lab.source_runner import FakeDomain, watcher_without_daemon

    watcher = watcher_without_daemon(asyncio.get_running_loop())
    client = {"family": 0, "node": "192.0.2.7", "service": "40000"}

    def live_event(phase: int) -> dict[str, Any]:
        """libvirt's callback, then the feeder's payload for what it buffered."""
        watcher.on_graphics(None, FakeDomain("web", 1, "uuid-w"), phase, client, client, "none", [], None)
        return watcher.live_payload(*watcher.buffer.take()[1:])["graphics"]

    live_event(0)
    assert live_event(2)["session"]["duration_exact"] is True  # a live session, both ends seen
    live_event(0)  # connected; then the source loses the hypervisor, and the client leaves
    watcher.snapshot_generation = 1  # the snapshot taken after the reconnection finds no client
    [gone] = watcher.snapshot_payloads(Snapshot(watcher, {}, 1))
    assert gone["graphics"]["phase"] == "disconnect" and gone["graphics"]["snapshot"] is True
    assert gone["graphics"]["session"]["duration_exact"] is False


def test_timestamps_are_what_datetime_writes_to_the_character():
    import datetime
    import random

    rnd = random.Random(3)
    walls = [1764097111.0, 1764097111.5, 1764097111.0000005, 1764097111.0000015, 1764097111.9999996,
             1764097111.9999994, 1764097199.999999, 0.0, 1.25]
    walls += [rnd.uniform(1.6e9, 2.1e9) for _n in range(20000)]
    walls += [int(w) + rnd.choice((0.0, 0.5, 1e-6, 0.9999995)) for w in walls[:2000]]
    for wall in walls:
        expected = datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat()
        assert ge.iso_timestamp_utc(wall) == expected, wall
    # the same second again after another one: not the cached text of the previous call
    assert ge.iso_timestamp_utc(86400.0) == "1970-01-02T00:00:00+00:00"
    assert ge.iso_timestamp_utc(0.5) == "1970-01-01T00:00:00.500000+00:00"


def test_identity_keys_for_many_types_stay_bounded():
    for n in range(500):
        assert ge.identity_key(f"someType{n}") == f"some_type{n}"
    assert ge.identity_key("saslUsername") == "sasl_username"
    assert len(ge._IDENTITY_KEYS) <= 64
