"""The source's busy heartbeat (hypervisor_watcher): a hypervisor's health event with
``changed: false`` follows its graphics events by ``busy_heartbeat_delay`` seconds, one at a
time however many events come, so that the classify filter has a clock while a storm starts;
``0`` sends none."""

from __future__ import annotations

import asyncio

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import EventBuffer
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import (
    HealthEvent,
    HypervisorWatcher,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import SourceArguments
from lab.source_runner import FakeDomain

ADDRESS = {"family": 0, "node": "10.0.0.1", "service": "1"}
DELAY = 0.1


def watcher(delay: float) -> HypervisorWatcher:
    config = SourceArguments({"uri": "qemu:///system", "busy_heartbeat_delay": delay, "max_event_rate": 0})
    return HypervisorWatcher("qemu:///system", config, EventBuffer(1000, asyncio.get_running_loop()))


def heartbeats(w: HypervisorWatcher) -> int:
    """Empty the buffer as the feed task does; the heartbeats taken (each ``changed: false``)."""
    found = 0
    while len(w.buffer):
        item = w.buffer.take()
        if isinstance(item, HealthEvent):
            [payload] = item.payloads()
            assert payload["hypervisor"]["changed"] is False
            found += 1
    return found


async def test_one_heartbeat_follows_a_burst_of_graphics_events_after_the_delay():
    w = watcher(DELAY)
    dom = FakeDomain("web", 1, "uuid-w")
    for _event in range(50):
        w.on_graphics(None, dom, 0, ADDRESS, ADDRESS, "none", [], None)
    await asyncio.sleep(DELAY / 2)
    assert len(w.buffer) == 50, "no heartbeat before the delay"
    await asyncio.sleep(DELAY)
    assert len(w.buffer) == 51 and heartbeats(w) == 1
    # the next event after it brings the next heartbeat
    w.on_graphics(None, dom, 2, ADDRESS, ADDRESS, "none", [], None)
    await asyncio.sleep(DELAY * 1.5)
    assert heartbeats(w) == 1


async def test_a_delay_of_0_sends_no_busy_heartbeat():
    w = watcher(0)
    dom = FakeDomain("web", 1, "uuid-w")
    for _event in range(5):
        w.on_graphics(None, dom, 0, ADDRESS, ADDRESS, "none", [], None)
    await asyncio.sleep(0.2)
    assert len(w.buffer) == 5 and heartbeats(w) == 0
