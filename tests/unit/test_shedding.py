"""The source's rate trigger for shedding (hypervisor_watcher): more graphics events in one
second than ``max_event_rate`` stop taking them (counted as skipped) and ask the watch loop to
shed, once; ``0`` never sheds."""

from __future__ import annotations

import asyncio

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import EventBuffer
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import HypervisorWatcher
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import SourceArguments
from lab.source_runner import FakeDomain

ADDRESS = {"family": 0, "node": "10.0.0.1", "service": "1"}


def watcher(rate: int) -> HypervisorWatcher:
    config = SourceArguments({"uri": "qemu:///system", "max_event_rate": rate})
    return HypervisorWatcher("qemu:///system", config, EventBuffer(1000, asyncio.get_running_loop()))


async def test_more_events_in_a_second_than_the_rate_are_skipped_and_shed_once():
    w = watcher(5)
    dom = FakeDomain("web", 1, "uuid-w")
    for _event in range(12):
        w.on_graphics(None, dom, 0, ADDRESS, ADDRESS, "none", [], None)
    await asyncio.sleep(0)  # on_shed runs on the loop
    assert len(w.buffer) == 5 and w.skipped == 7 and w.shedding
    assert w.shed_due() and w.shed_reason == "more than 5 graphics events in one second: not listening for 10s"
    assert w.wakeup.is_set()


async def test_a_rate_of_0_never_sheds():
    w = watcher(0)
    dom = FakeDomain("web", 1, "uuid-w")
    for _event in range(500):
        w.on_graphics(None, dom, 0, ADDRESS, ADDRESS, "none", [], None)
    await asyncio.sleep(0)
    assert len(w.buffer) == 500 and w.skipped == 0 and not w.shed_due()
