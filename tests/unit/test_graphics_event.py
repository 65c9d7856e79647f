"""The libvirt-to-payload mapping and session tracking (pure logic)."""

from __future__ import annotations

from typing import Any

from ansible_collections.virtguard.console.plugins.plugin_utils import graphics_event as ge
from ansible_collections.virtguard.console.plugins.plugin_utils.session_tracking import PresentClient, SessionTracker

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
    [(local, remote, auth, subject, protocol, channels), second] = ge.clients_from_query_vnc(answer)
    bare = second[3]
    assert local == {"family": "ipv4", "node": "0.0.0.0", "service": "5901"}
    assert remote == {"family": "ipv6", "node": "::ffff:192.0.2.1", "service": "41000"}
    assert auth == "vencrypt+x509+sasl" and protocol == "vnc" and channels == [remote]
    assert subject == [("x509dname", "CN=a"), ("saslUsername", "alice")] and bare == []
    assert ge.clients_from_query_vnc({"enabled": False}) == []


def spice_channel(port: str, connection: int, kind: int, host: str = "192.0.2.3", tls: bool = True) -> dict[str, Any]:
    return {"family": "ipv4", "host": host, "port": port, "tls": tls, "connection-id": connection,
            "channel-type": kind, "channel-id": 0}


def test_query_spice_groups_channels_by_connection_with_the_main_channel_first():
    # as QEMU 7.2 answers for a held spicy (main, display, inputs, cursor) and a second client
    answer = {"enabled": True, "auth": "spice", "host": "0.0.0.0", "port": 5930, "tls-port": 5931,
              "channels": [spice_channel("42001", 7, 2), spice_channel("42000", 7, 1), spice_channel("42002", 7, 3),
                           spice_channel("42003", 7, 4), spice_channel("43000", -9, 1, "192.0.2.4", tls=False)]}
    [first, second] = ge.clients_from_query_spice(answer)
    local, remote, auth, subject, protocol, channels = first
    assert local["service"] == "5931" and remote == {"family": "ipv4", "node": "192.0.2.3", "service": "42000"}
    assert [c["service"] for c in channels] == ["42000", "42001", "42002", "42003"]
    assert auth == "spice" and subject == [] and protocol == "spice"
    assert second[0]["service"] == "5930" and [c["service"] for c in second[5]] == ["43000"]
    assert ge.spice_ports(answer) == {"5930", "5931"}
    assert ge.clients_from_query_spice({"enabled": False}) == [] and ge.spice_ports(None) == set()


def test_query_spice_keeps_two_clients_of_one_address_apart():
    # two SPICE clients behind one NAT: the same host, other connection ids (mutation testing, issue 21)
    answer = {"enabled": True, "auth": "none", "host": "0.0.0.0", "port": 5930,
              "channels": [spice_channel("42000", 7, 1, tls=False), spice_channel("42500", 8, 1, tls=False),
                           spice_channel("42001", 7, 2, tls=False), spice_channel("42501", 8, 2, tls=False)]}
    clients = ge.clients_from_query_spice(answer)
    assert [[c["service"] for c in client[5]] for client in clients] == [["42000", "42001"], ["42500", "42501"]]
    assert [client[1]["service"] for client in clients] == ["42000", "42500"]


def test_the_protocol_of_a_live_event_follows_qemus_auth_schemes():
    vnc_local = {"family": "ipv4", "node": "0.0.0.0", "service": "5900"}
    spice_local = dict(vnc_local, service="5930")
    assert ge.live_protocol("", spice_local) == "spice"  # SPICE connect and disconnect
    assert ge.live_protocol("spice", spice_local) == "spice"
    for scheme in ("none", "vnc", "vencrypt+x509+sasl", "sasl"):
        assert ge.live_protocol(scheme, vnc_local) == "vnc"
    # an initialize of "none" or "sasl" whose connect was missed: the snapshot's SPICE ports decide
    assert ge.live_protocol("sasl", spice_local, {"5930", "5931"}) == "spice"
    assert ge.live_protocol("sasl", vnc_local, {"5930", "5931"}) == "vnc"


def test_the_payload_names_its_protocol():
    payload = ge.graphics_payload("connect", "t", {}, {}, REMOTE, REMOTE, "", [], {"id": "s"}, protocol="spice")
    assert payload["graphics"]["protocol"] == "spice"
    assert ge.graphics_payload("connect", "t", {}, {}, REMOTE, REMOTE, "none", [], {})["graphics"]["protocol"] == "vnc"


def details(subject=(), remote=None, uuid="u-1"):
    return ({"name": "d", "uuid": uuid}, {}, REMOTE if remote is None else remote, "none", list(subject))


def present(*channels: str, subject=(), protocol: str = "vnc") -> PresentClient:
    return PresentClient(details(subject), protocol, list(channels))


def test_tracker_live_session():
    tracker = SessionTracker()
    assert tracker.observe("s", "connect", 10.0, details()) == (
        "s", {"id": "s", "authenticated": False, "primary": True, "channels": 1})
    assert tracker.observe("s", "initialize", 10.5, details())[1] == {"id": "s", "authenticated": True,
                                                                      "primary": True, "channels": 1}
    assert tracker.observe("s", "disconnect", 12.25, details())[1] == {
        "id": "s", "authenticated": True, "primary": True, "channels": 0, "duration_s": 2.25, "duration_exact": True,
        "ended_by": "client"}
    assert len(tracker) == 0 and not tracker.channel_sessions


def test_tracker_failed_authentication_and_unknown_disconnects():
    tracker = SessionTracker()
    tracker.observe("s", "connect", 1.0, details())
    assert tracker.observe("s", "disconnect", 2.0, details())[1]["authenticated"] is False
    assert tracker.observe("u", "disconnect", 3.0, details([("saslUsername", "x")]))[1] == {
        "id": "u", "authenticated": True, "primary": True, "channels": 0, "duration_s": None, "duration_exact": False,
        "ended_by": "client"}


def spice_events(tracker: SessionTracker, channel: str, phases: str, now: float, remote=None, uuid="u-1"):
    return [tracker.observe(channel, phase, now, details(remote=remote, uuid=uuid), "spice")
            for phase in phases.split()]


def test_the_channels_of_a_spice_client_are_one_session_whose_primary_is_the_main_channel():
    """As spicy makes them: main, then display, inputs and cursor, each connect + initialize;
    the channels leave, the main one last."""
    tracker = SessionTracker()
    main = spice_events(tracker, "main", "connect initialize", 1.0)
    assert main == [("main", {"id": "main", "authenticated": False, "primary": True, "channels": 1}),
                    ("main", {"id": "main", "authenticated": True, "primary": True, "channels": 1})]
    for n, channel in enumerate(("display", "inputs", "cursor"), start=2):
        connect, initialize = spice_events(tracker, channel, "connect initialize", 1.1)
        assert connect == ("main", {"id": "main", "authenticated": True, "primary": False, "channels": n})
        assert initialize[1]["primary"] is False
    ends = [spice_events(tracker, channel, "disconnect", 7.0)[0] for channel in ("inputs", "display", "cursor")]
    assert [(sid, end["channels"]) for sid, end in ends] == [("main", 3), ("main", 2), ("main", 1)]
    assert all(end["primary"] is False and "duration_s" not in end for _sid, end in ends)
    [(sid, last)] = spice_events(tracker, "main", "disconnect", 7.5)
    assert (sid, last) == ("main", {"id": "main", "authenticated": True, "primary": True, "channels": 0,
                                    "duration_s": 6.5, "duration_exact": True, "ended_by": "client"})
    assert len(tracker) == 0 and not tracker.channel_sessions and not tracker.spice_groups


def test_spice_clients_are_kept_apart_by_address_and_domain_and_a_new_client_after_the_last_channel():
    tracker = SessionTracker()
    other_address = dict(REMOTE, node="192.0.2.99")
    assert spice_events(tracker, "a", "connect", 1.0)[0][0] == "a"
    assert spice_events(tracker, "b", "connect", 1.0, remote=other_address)[0][0] == "b"
    assert spice_events(tracker, "c", "connect", 1.0, uuid="u-2")[0][0] == "c"
    assert spice_events(tracker, "a2", "connect", 1.1)[0][0] == "a"
    spice_events(tracker, "a2", "disconnect", 2.0)
    spice_events(tracker, "a", "disconnect", 2.0)  # a failed login: main only, never initialized
    assert tracker.observe("a", "disconnect", 2.0, details(), "spice")[1]["primary"] is True
    [(sid, again)] = spice_events(tracker, "a3", "connect", 3.0)  # the same address again: a new client
    assert sid == "a3" and again["primary"] is True


def test_a_connect_again_on_an_open_lone_channel_is_a_new_session():
    """The same client address and port again (its disconnect was missed): the new session
    starts there, with its own start; a SPICE channel that joined a client is not restarted."""
    tracker = SessionTracker()
    tracker.observe("v", "connect", 1.0, details())
    tracker.observe("v", "initialize", 1.1, details())
    assert tracker.observe("v", "connect", 5.0, details()) == (
        "v", {"id": "v", "authenticated": False, "primary": True, "channels": 1})
    assert tracker.observe("v", "disconnect", 6.0, details())[1]["duration_s"] == 1.0
    spice_events(tracker, "main", "connect initialize", 1.0)
    spice_events(tracker, "display", "connect", 1.1)
    [(sid, again)] = spice_events(tracker, "main", "connect", 2.0)
    assert (sid, again["channels"], again["authenticated"]) == ("main", 2, True)


def test_vnc_sessions_from_one_address_are_never_grouped():
    tracker = SessionTracker()
    assert tracker.observe("v1", "connect", 1.0, details())[0] == "v1"
    assert tracker.observe("v2", "connect", 1.0, details())[0] == "v2"


def test_reconcile_reports_present_and_gone_but_leaves_touched_sessions_to_live_events():
    tracker = SessionTracker()
    tracker.observe("stays", "connect", 1.0, details())
    tracker.observe("gone", "connect", 1.0, details())
    tracker.observe("live-new", "connect", 5.0, details())
    clients = {"stays": present("stays"), "new": present("new", subject=[("saslUsername", "a")]),
               "ended-live": present("ended-live")}
    initialized, gone = tracker.reconcile(clients, 6.0, touched={"ended-live", "live-new"})
    assert [entry[0] for entry in initialized] == ["stays", "new"]
    assert all(entry[1]["authenticated"] and entry[1]["primary"] for entry in initialized)
    assert [(entry[0], entry[1]["duration_s"], entry[1]["duration_exact"]) for entry in gone] == [("gone", 5.0, False)]
    assert set(tracker.sessions) == {"stays", "new", "live-new"}


def test_a_snapshot_regroups_spice_channels_exactly():
    """Two clients behind one address, the second linked while the first still had channels
    open: live events merge them; query-spice's connection ids part them again."""
    tracker = SessionTracker()
    for channel in ("a-main", "a-display", "b-main", "b-display"):
        spice_events(tracker, channel, "connect", 1.0)
    assert set(tracker.sessions) == {"a-main"}
    initialized, gone = tracker.reconcile({"a-main": present("a-main", "a-display", protocol="spice"),
                                           "b-main": present("b-main", "b-display", protocol="spice")}, 2.0)
    assert [(sid, s["channels"], protocol) for sid, s, _d, protocol in initialized] == [
        ("a-main", 2, "spice"), ("b-main", 2, "spice")]
    assert gone == []
    assert tracker.observe("b-display", "disconnect", 3.0, details(), "spice")[0] == "b-main"
    assert tracker.observe("a-display", "disconnect", 3.0, details(), "spice")[0] == "a-main"


def test_a_duration_is_exact_only_when_the_source_saw_the_session_begin_and_end():
    tracker = SessionTracker()
    tracker.observe("live", "connect", 1.0, details())
    tracker.observe("missed-connect", "initialize", 1.0, details())  # the source started after its connect
    tracker.reconcile({sid: present(sid) for sid in ("live", "missed-connect", "from-snapshot")}, 2.0)
    ends = {sid: tracker.observe(sid, "disconnect", 4.0, details())[1]
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
    _initialized, [(session_id, session, _details, protocol)] = tracker.reconcile({}, 68.7)
    assert (session_id, protocol) == ("s", "vnc")
    assert session == {"id": "s", "authenticated": True, "primary": True, "channels": 0, "duration_s": 58.7,
                       "duration_exact": False, "ended_by": "client"}


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
    [gone] = watcher.snapshot_payloads(Snapshot(watcher, {}, {}, 1))
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
