"""The health of each hypervisor's connection: the state machine, its events and log lines, and
the heartbeat's timing, with the time passed in (pure logic, no daemon)."""

from __future__ import annotations

import asyncio
import datetime
import logging

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_health import (
    CONNECTED,
    CONNECTING,
    RECONNECTING,
    STATES,
    UNREACHABLE,
    HeartbeatClock,
    HypervisorHealth,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import HealthEvent
from lab.source_log import SOURCE_LOGGER
from lab.source_runner import watcher_without_daemon

URI = "qemu+tls://kvm1.example.com/system"
WALL = 1764097111.25


def test_a_hypervisor_starts_connecting_and_reports_each_change_once():
    health = HypervisorHealth(URI)
    assert (health.state, health.previous, health.reason, health.hostname) == (CONNECTING, None, None, None)
    assert health.change(RECONNECTING, "cannot connect: refused", WALL) == {"hypervisor": {
        "uri": URI, "hostname": None, "state": "reconnecting", "previous": "connecting", "changed": True,
        "reason": "cannot connect: refused", "timestamp": "2025-11-25T18:58:31.250000+00:00"}}
    assert health.change(RECONNECTING, "cannot connect: refused again", WALL + 2) is None  # no news
    health.hostname = "kvm1"
    connected = health.change(CONNECTED, None, WALL + 4)
    assert connected is not None and connected["hypervisor"] == {
        "uri": URI, "hostname": "kvm1", "state": "connected", "previous": "reconnecting", "changed": True,
        "reason": None, "timestamp": "2025-11-25T18:58:35.250000+00:00"}
    assert health.first_connection
    lost = health.change(RECONNECTING, "connection closed: keepalive timeout", WALL + 9)
    assert lost is not None and lost["hypervisor"]["previous"] == "connected"
    unreachable = health.change(UNREACHABLE, "kvm1.example.com:16514 did not answer within 5s", WALL + 10)
    assert unreachable is not None
    changed = unreachable["hypervisor"]
    assert (changed["state"], changed["previous"]) == ("unreachable", "reconnecting")
    assert unreachable["hypervisor"]["hostname"] == "kvm1"  # the last one libvirt gave
    assert health.change(CONNECTED, None, WALL + 11) is not None
    assert not health.first_connection  # a connection again is news


def test_a_heartbeat_reports_the_current_state_unchanged():
    health = HypervisorHealth(URI)
    assert health.heartbeat(WALL)["hypervisor"] == {
        "uri": URI, "hostname": None, "state": "connecting", "previous": None, "changed": False, "reason": None,
        "timestamp": "2025-11-25T18:58:31.250000+00:00"}
    health.change(RECONNECTING, "connection lost", WALL)
    beat = health.heartbeat(WALL + 10)["hypervisor"]
    assert (beat["state"], beat["previous"], beat["changed"], beat["reason"]) == (
        "reconnecting", "connecting", False, "connection lost")
    assert datetime.datetime.fromisoformat(beat["timestamp"]).utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize("state", [CONNECTING, "deaf", ""])
def test_a_state_that_is_not_one_to_enter_is_a_programming_error(state):
    with pytest.raises(ValueError, match="not a state"):
        HypervisorHealth(URI).change(state, None, WALL)


def test_every_state_is_documented():
    assert set(STATES) == {"connecting", "connected", "reconnecting", "unreachable", "blind", "shedding",
                           "resynchronised"}
    assert all(STATES.values())


def test_the_heartbeat_is_due_every_interval_and_a_late_one_does_not_bring_a_burst():
    clock = HeartbeatClock(10, now=100.0)
    assert clock.delay(100.0) == 10.0 and not clock.due(100.0)
    assert clock.delay(104.0) == 6.0 and not clock.due(109.999)
    assert clock.due(110.0) and not clock.due(110.0)  # taken once
    assert clock.delay(111.0) == 9.0
    assert clock.due(120.5) and clock.next_at == 130.0  # a little late: the next keeps its time
    assert clock.due(175.0) and not clock.due(175.0)  # the loop was busy for 45 s: one beat, not four
    assert clock.next_at == 185.0 and clock.delay(200.0) == 0.0


@pytest.mark.parametrize("interval", [0, -1])
def test_a_heartbeat_clock_needs_an_interval(interval):
    with pytest.raises(ValueError, match="interval"):
        HeartbeatClock(interval, 0.0)


# -- the watcher: changes logged and buffered in order, heartbeats that never pile up ------------

async def test_each_change_is_logged_and_buffered_the_first_connection_at_info(caplog):
    caplog.set_level(logging.INFO, logger=SOURCE_LOGGER)
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    watcher.health.hostname = "kvm1"
    watcher.enter(CONNECTED, None)
    watcher.enter(CONNECTED, None)  # the same state: nothing
    watcher.enter(RECONNECTING, "connection closed: end of file (the daemon went away)")
    watcher.enter(CONNECTED, None)
    events = []
    while (item := watcher.buffer.take()) is not None:
        assert isinstance(item, HealthEvent)
        events += item.payloads()
    assert [(e["hypervisor"]["state"], e["hypervisor"]["previous"], e["hypervisor"]["changed"]) for e in events] == [
        ("connected", "connecting", True), ("reconnecting", "connected", True), ("connected", "reconnecting", True)]
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == SOURCE_LOGGER]
    assert logged == [
        (logging.INFO, "qemu:///system: hypervisor connected (was connecting)"),
        (logging.WARNING, "qemu:///system: hypervisor reconnecting (was connected): connection closed: end of file "
                          "(the daemon went away)"),
        (logging.WARNING, "qemu:///system: hypervisor connected (was reconnecting)"),
    ]


async def test_a_heartbeat_waits_in_the_buffer_at_most_once_per_hypervisor():
    """A stalled queue: the beats due meanwhile are one, delivered when the queue moves."""
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    for _beat in range(5):
        watcher.send_heartbeat()
    assert len(watcher.buffer) == 1
    watcher.enter(RECONNECTING, "connection lost")  # a change is never held back
    [beat] = watcher.buffer.take().payloads()
    assert (beat["hypervisor"]["state"], beat["hypervisor"]["changed"]) == ("connecting", False)
    watcher.send_heartbeat()
    [change] = watcher.buffer.take().payloads()
    [beat] = watcher.buffer.take().payloads()
    assert (change["hypervisor"]["changed"], beat["hypervisor"]["changed"]) == (True, False)
    assert beat["hypervisor"]["state"] == "reconnecting"
    assert watcher.buffer.take() is None


def test_a_blind_connection_then_its_resynchronised_successor_are_changes_and_connections():
    health = HypervisorHealth(URI)
    health.change("connected", None, WALL)
    blind = health.change("blind", "no probe event", WALL)
    healed = health.change("resynchronised", "connected again", WALL)
    assert blind is not None and healed is not None
    assert (blind["hypervisor"]["previous"], blind["hypervisor"]["reason"]) == ("connected", "no probe event")
    assert healed["hypervisor"]["previous"] == "blind"
    assert health.connections == 2 and not health.first_connection
