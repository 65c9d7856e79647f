"""A domain that stops ends its console sessions, though libvirt reports no graphics disconnect
for them: the tracker closes them (every channel, in the shape of a client's disconnects), the
watcher takes libvirt's lifecycle events in order with the graphics ones, and a snapshot tells a
session whose domain is gone from one whose client left (pure logic, no daemon)."""

from __future__ import annotations

import asyncio
from typing import Any

import libvirt

from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import (
    DomainStopped,
    Snapshot,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.session_tracking import PresentClient, SessionTracker
from lab.source_runner import FakeDomain, watcher_without_daemon

LOCAL = {"family": "ipv4", "node": "0.0.0.0", "service": "5900"}
SPICE_LOCAL = {"family": "ipv4", "node": "0.0.0.0", "service": "5930"}
SPICE_TLS_LOCAL = dict(SPICE_LOCAL, service="5931")


def remote(port: int, node: str = "192.0.2.7") -> dict[str, str]:
    return {"family": "ipv4", "node": node, "service": str(port)}


def domain(uuid: str, dom_id: int = 1) -> dict[str, Any]:
    return {"name": f"dom-{uuid}", "uuid": uuid, "id": dom_id}


def details(uuid: str, port: int, local: dict[str, Any] | None = None, auth: str = "none", subject=(),
            dom_id: int = 1):
    return (domain(uuid, dom_id), LOCAL if local is None else local, remote(port), auth, list(subject))


def vnc_session(tracker: SessionTracker, channel: str, uuid: str, port: int, now: float = 1.0) -> None:
    subject = [("saslUsername", "alice")]
    tracker.observe(channel, "connect", now, details(uuid, port))
    tracker.observe(channel, "initialize", now, details(uuid, port, subject=subject))


def spice_channel(tracker: SessionTracker, channel: str, uuid: str, port: int,
                  local: dict[str, Any] | None = None, now: float = 1.0) -> dict[str, Any]:
    local = SPICE_LOCAL if local is None else local
    tracker.observe(channel, "connect", now, details(uuid, port, local=local, auth=""), "spice")
    return tracker.observe(channel, "initialize", now, details(uuid, port, local=local, auth="none"), "spice")[1]


def test_a_domains_end_closes_its_vnc_sessions_only():
    tracker = SessionTracker()
    vnc_session(tracker, "a1", "dom-a", 40001, now=1.0)
    vnc_session(tracker, "a2", "dom-a", 40002, now=2.0)
    vnc_session(tracker, "b1", "dom-b", 40003)
    ended = tracker.end_domain("dom-a", 5.0)
    assert [(sid, mapping) for sid, mapping, _details, _protocol in ended] == [
        ("a1", {"id": "a1", "authenticated": True, "primary": True, "channels": 0, "duration_s": 4.0,
                "duration_exact": True, "ended_by": "domain"}),
        ("a2", {"id": "a2", "authenticated": True, "primary": True, "channels": 0, "duration_s": 3.0,
                "duration_exact": True, "ended_by": "domain"}),
    ]
    # as libvirt's disconnect of an authenticated VNC session: its addresses, scheme and subject
    assert ended[0][2] == details("dom-a", 40001, subject=[("saslUsername", "alice")])
    assert {protocol for *_rest, protocol in ended} == {"vnc"}
    assert set(tracker.sessions) == {"b1"} and set(tracker.channel_sessions) == {"b1"}
    assert tracker.end_domain("dom-a", 6.0) == []  # nothing left there
    # the other domain's session still ends by its client
    assert tracker.observe("b1", "disconnect", 7.0, details("dom-b", 40003))[1]["ended_by"] == "client"


def test_a_domains_end_closes_every_channel_of_a_spice_client_the_primary_last():
    """As a held spicy: main, display, inputs, cursor (one on the TLS port); the domain stops."""
    tracker = SessionTracker()
    ports = {"main": 42000, "display": 42001, "inputs": 42002, "cursor": 42003}
    for channel, port in ports.items():
        spice_channel(tracker, channel, "dom-a", port, local=SPICE_TLS_LOCAL if channel == "display" else SPICE_LOCAL)
    spice_channel(tracker, "other", "dom-b", 43000)
    ended = tracker.end_domain("dom-a", 9.0)
    assert [mapping["channels"] for _sid, mapping, _d, _p in ended] == [3, 2, 1, 0]
    assert [mapping["primary"] for _sid, mapping, _d, _p in ended] == [False, False, False, True]
    assert {sid for sid, *_rest in ended} == {"main"}
    assert all(mapping["ended_by"] == "domain" and mapping["authenticated"] for _sid, mapping, _d, _p in ended)
    assert all("duration_s" not in mapping for _sid, mapping, _d, _p in ended[:3])
    assert (ended[3][1]["duration_s"], ended[3][1]["duration_exact"]) == (8.0, True)
    # each channel's own addresses; QEMU names no auth scheme on a SPICE disconnect
    by_port = {d[2]["service"]: d for _sid, _m, d, _p in ended}
    assert set(by_port) == {str(port) for port in ports.values()}
    assert ended[3][2][2] == remote(ports["main"])
    assert by_port["42001"][1] == SPICE_TLS_LOCAL and by_port["42002"][1] == SPICE_LOCAL
    assert {d[3] for _sid, _m, d, _p in ended} == {""}
    assert {p for *_rest, p in ended} == {"spice"}
    assert set(tracker.sessions) == {"other"} and set(tracker.spice_groups) == {("dom-b", "192.0.2.7")}
    # a client of that address on the restarted domain is a new session
    assert spice_channel(tracker, "again", "dom-a", 44000)["primary"] is True


def test_a_spice_client_whose_main_channel_left_first_ends_with_its_last_channel():
    tracker = SessionTracker()
    spice_channel(tracker, "main", "dom-a", 42000)
    spice_channel(tracker, "display", "dom-a", 42001)
    tracker.observe("main", "disconnect", 2.0, details("dom-a", 42000, local=SPICE_LOCAL, auth=""), "spice")
    [(sid, mapping, channel, _protocol)] = tracker.end_domain("dom-a", 3.0)
    assert (sid, mapping) == ("main", {"id": "main", "authenticated": True, "primary": False, "channels": 0,
                                       "ended_by": "domain"})
    assert channel[2] == remote(42001)
    assert not tracker.sessions and not tracker.channel_sessions and not tracker.spice_groups


def test_a_spice_client_a_snapshot_found_ends_with_the_channels_the_snapshot_listed():
    tracker = SessionTracker()
    channels = [(SPICE_LOCAL, remote(42000)), (SPICE_TLS_LOCAL, remote(42001))]
    client = PresentClient(details("dom-a", 42000, local=SPICE_LOCAL), "spice", ["main", "display"], channels)
    tracker.reconcile({"main": client}, 1.0)
    ended = tracker.end_domain("dom-a", 4.0)
    assert [(m["primary"], m["channels"], d[1], d[2]) for _sid, m, d, _p in ended] == [
        (False, 1, SPICE_TLS_LOCAL, remote(42001)), (True, 0, SPICE_LOCAL, remote(42000))]
    assert (ended[1][1]["duration_s"], ended[1][1]["duration_exact"]) == (3.0, False)  # began before the snapshot


def test_a_snapshot_says_a_session_was_ended_by_its_domain_when_that_domains_run_is_gone():
    tracker = SessionTracker()
    vnc_session(tracker, "client-left", "dom-a", 40001)
    vnc_session(tracker, "domain-gone", "dom-b", 40002)
    vnc_session(tracker, "domain-restarted", "dom-c", 40003)  # id 1; it runs again as id 7
    vnc_session(tracker, "stays", "dom-a", 40004)
    present = {"stays": PresentClient(details("dom-a", 40004), "vnc", ["stays"])}
    _initialized, gone = tracker.reconcile(present, 5.0, running={"dom-a": 1, "dom-c": 7})
    assert {sid: mapping["ended_by"] for sid, mapping, _d, _p in gone} == {
        "client-left": "client", "domain-gone": "domain", "domain-restarted": "domain"}
    assert all(m["primary"] and m["channels"] == 0 and m["duration_exact"] is False for _sid, m, _d, _p in gone)
    # not knowing which domains run, the source cannot blame the domain
    vnc_session(tracker, "unknown", "dom-b", 40005)
    _initialized, [(sid, mapping, _d, _p)] = tracker.reconcile(present, 6.0)
    assert (sid, mapping["ended_by"]) == ("unknown", "client")


# -- the watcher: libvirt's lifecycle callback, in order with the graphics events ----------------

def graphics(watcher, dom: FakeDomain, phase: int, port: int) -> None:
    client = {"family": 0, "node": "192.0.2.7", "service": str(port)}
    watcher.on_graphics(None, dom, phase, {"family": 0, "node": "0.0.0.0", "service": "5900"}, client, "none", [],
                        None)


def drain(watcher) -> list[dict[str, Any]]:
    """What the feeder would put on the queue for everything buffered, in order."""
    payloads: list[dict[str, Any]] = []
    while (item := watcher.buffer.take()) is not None:
        payloads += [watcher.live_payload(*item[1:])] if isinstance(item, tuple) else item.payloads()
    return payloads


async def test_a_stopped_domain_ends_its_sessions_in_order_with_the_graphics_events():
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    web, db = FakeDomain("web", 3, "uuid-web"), FakeDomain("db", 4, "uuid-db")
    graphics(watcher, web, 0, 40001)
    graphics(watcher, web, 1, 40001)
    graphics(watcher, db, 0, 40002)
    for event in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_RESUMED,
                  libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED):  # a paused domain keeps its clients
        watcher.on_lifecycle(None, FakeDomain("web", 3, "uuid-web"), event, 0, None)
    # a stopped domain's id is -1: its UUID names it
    watcher.on_lifecycle(None, FakeDomain("web", -1, "uuid-web"), libvirt.VIR_DOMAIN_EVENT_STOPPED,
                         libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, None)
    graphics(watcher, db, 1, 40002)
    events = [payload["graphics"] for payload in drain(watcher)]
    assert [(e["phase"], e["domain"]["name"]) for e in events] == [
        ("connect", "web"), ("initialize", "web"), ("connect", "db"), ("disconnect", "web"), ("initialize", "db")]
    end = events[3]
    assert end["session"]["id"] == events[0]["session"]["id"]
    assert end["session"]["ended_by"] == "domain" and end["session"]["channels"] == 0 and end["session"]["primary"]
    assert end["snapshot"] is False and end["protocol"] == "vnc"
    assert end["domain"] == {"name": "web", "uuid": "uuid-web", "id": 3}  # the run the session belonged to
    assert end["remote"]["service"] == "40001" and end["auth_scheme"] == "none"
    assert len(watcher.sessions) == 1


async def test_the_lifecycle_callback_keeps_to_the_domain_filter_and_never_raises():
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    watcher.config.domains = ["web-*"]
    watcher.on_lifecycle(None, FakeDomain("db-1", -1, "u"), libvirt.VIR_DOMAIN_EVENT_STOPPED, 0, None)
    assert watcher.buffer.take() is None

    class Broken(FakeDomain):
        def name(self):
            raise libvirt.libvirtError("gone")

    watcher.on_lifecycle(None, Broken("web-1", -1, "u"), libvirt.VIR_DOMAIN_EVENT_STOPPED, 0, None)
    assert watcher.buffer.take() is None
    watcher.on_lifecycle(None, FakeDomain("web-1", -1, "u"), libvirt.VIR_DOMAIN_EVENT_STOPPED, 42, None)
    assert isinstance(watcher.buffer.take(), DomainStopped)


async def test_a_snapshot_in_flight_when_a_domain_stopped_does_not_bring_its_clients_back():
    """QEMU listed the client, then the domain stopped before the snapshot was merged."""
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    web = FakeDomain("web", 3, "uuid-web")
    graphics(watcher, web, 0, 40001)
    drain(watcher)
    watcher.snapshot_generation = 1
    watcher.touched_since_snapshot = set()  # the snapshot is being taken
    [session_id] = watcher.sessions.sessions
    client = PresentClient((domain("uuid-web", 3), LOCAL, remote(40001), "none", []), "vnc", [session_id])
    watcher.on_lifecycle(None, FakeDomain("web", -1, "uuid-web"), libvirt.VIR_DOMAIN_EVENT_STOPPED, 0, None)
    watcher.buffer.append(Snapshot(watcher, {session_id: client}, {}, 1, {"uuid-web": 3}))
    events = [payload["graphics"] for payload in drain(watcher)]
    assert [(e["phase"], e["snapshot"], e["session"]["ended_by"]) for e in events] == [("disconnect", False, "domain")]
    assert len(watcher.sessions) == 0


async def test_a_stopped_domain_is_said_in_the_log_with_libvirts_reason(caplog):
    """The operator's line: which domain, why (libvirt's STOPPED detail, its number when libvirt
    adds one this source does not know), how many sessions it ended; none without sessions."""
    import logging

    watcher = watcher_without_daemon(asyncio.get_running_loop())
    web, db = FakeDomain("web", 3, "uuid-web"), FakeDomain("db", 4, "uuid-db")
    for port in (40001, 40002):
        graphics(watcher, web, 0, port)
    graphics(watcher, db, 0, 40003)
    drain(watcher)
    with caplog.at_level(logging.INFO, logger="virtguard.console.libvirt_graphics"):
        for name, uuid, detail in (("web", "uuid-web", 0), ("db", "uuid-db", 7), ("idle", "uuid-idle", 2)):
            payloads = watcher.domain_stopped_payloads(DomainStopped(watcher, 0.0, name, uuid, detail))
            assert all(p["graphics"]["session"]["ended_by"] == "domain" for p in payloads)
    assert [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()] == [
        f"{watcher.uri}: domain web stopped (shutdown): 2 console session(s) ended",
        f"{watcher.uri}: domain db stopped (7): 1 console session(s) ended"]
    assert not watcher.sessions
