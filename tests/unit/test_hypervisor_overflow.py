"""The source's buffer overflow (hypervisor_watcher): when the buffer is full, a hypervisor's
graphics events are dropped and counted until the queue has drained to half, and the resume
states how many were dropped before a snapshot resynchronises it (mutation testing, issue 21)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import EventBuffer
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import HypervisorWatcher
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import SourceArguments
from lab.source_runner import FakeDomain

ADDRESS = {"family": 0, "node": "10.0.0.1", "service": "1"}
URI = "qemu:///system"


async def test_events_past_a_full_buffer_are_dropped_counted_and_stated_on_resume(
        caplog: pytest.LogCaptureFixture) -> None:
    w = HypervisorWatcher(URI, SourceArguments({"uri": URI}), EventBuffer(4, asyncio.get_running_loop()))
    dom = FakeDomain("web", 1, "uuid-w")
    with caplog.at_level(logging.WARNING):
        for _event in range(7):
            w.on_graphics(None, dom, 0, ADDRESS, ADDRESS, "none", [], None)
        await asyncio.sleep(0)  # the wakeup is set on the loop
        assert len(w.buffer) == 4 and w.overflowed and w.dropped == 3 and w.wakeup.is_set()
        snapshots = []

        async def take_snapshot(loop: asyncio.AbstractEventLoop) -> None:
            snapshots.append(w.dropped)

        w.take_snapshot = take_snapshot  # type: ignore[method-assign]
        while len(w.buffer) > 2:  # the queue drains to half
            w.buffer.take()
        await w.resume_after_overflow(asyncio.get_running_loop())
    assert (snapshots, w.overflowed) == ([0], False)  # counted anew from the resume
    assert f"{URI}: resuming after dropping 3 events; resynchronising by snapshot" in caplog.messages
    w.on_graphics(None, dom, 0, ADDRESS, ADDRESS, "none", [], None)  # listened to again
    assert len(w.buffer) == 3 and w.dropped == 0
