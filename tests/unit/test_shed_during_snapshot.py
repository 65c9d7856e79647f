"""A storm that comes while a snapshot waits for its answers is shed at once: libvirtd queues
the snapshot's replies behind the storm's events, so a source that waited for them before
deregistering would let libvirtd queue the storm all along (75 MB in a 10 s storm, and a
keepalive drop, in tests/integration/test_event_source_shedding.py)."""

from __future__ import annotations

import asyncio
import threading

import libvirt
import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_health import SHEDDING
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import Snapshot
from lab.source_runner import watcher_without_daemon


class BackloggedConnection:
    """A connection whose answer to the snapshot's first question waits until ``answer`` is
    set (as behind libvirtd's queue of events), and which records deregistrations."""

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.asked = threading.Event()
        self.deregistered: list[tuple[int, bool]] = []  # (callback id, whether the snapshot was answered)

    def listAllDomains(self, flags: int) -> list[object]:  # noqa: N802 (libvirt's name)
        self.asked.set()
        self.answer.wait(10)
        return []

    def domainEventDeregisterAny(self, callback_id: int) -> int:  # noqa: N802
        self.deregistered.append((callback_id, self.answer.is_set()))
        return 0


@pytest.mark.parametrize("storm", [True, False])
async def test_a_storm_during_a_snapshot_is_shed_before_the_snapshot_is_answered(storm: bool) -> None:
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    conn = BackloggedConnection()
    watcher.conn, watcher.callback_id = conn, 7
    snapshot = asyncio.ensure_future(watcher.take_snapshot(asyncio.get_running_loop()))
    assert await asyncio.to_thread(conn.asked.wait, 5)
    if storm:
        watcher.request_shed("more than 200 graphics events in one second")
    for _attempt in range(100):  # time for a deregistration to reach the connection
        if conn.deregistered:
            break
        await asyncio.sleep(0.01)
    conn.answer.set()
    await asyncio.wait_for(snapshot, 5)

    taken = [item for item in watcher.buffer.parts if isinstance(item, Snapshot)]
    assert len(taken) == 1  # the snapshot is still reported
    if storm:
        assert conn.deregistered == [(7, False)]  # before the snapshot's answer came
        assert watcher.callback_id == -1 and watcher.shedding
        assert watcher.health.state == SHEDDING
    else:  # the control: nothing asked to shed, nothing deregistered
        assert conn.deregistered == []
        assert watcher.callback_id == 7 and not watcher.shedding


class RefusingConnection(BackloggedConnection):
    """A backlogged connection that refuses the deregistration (a dying connection)."""

    def domainEventDeregisterAny(self, callback_id: int) -> int:  # noqa: N802
        super().domainEventDeregisterAny(callback_id)
        raise libvirt.libvirtError("internal error: client socket is closed")


async def test_a_refused_deregistration_during_a_snapshot_closes_the_connection_once() -> None:
    """The shed cannot stop libvirtd from queueing: the connection is closed (the caller's loop
    reconnects once the questions end), loudly, and the refusal is not retried on every wakeup."""
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    conn = RefusingConnection()
    watcher.conn, watcher.callback_id = conn, 7
    snapshot = asyncio.ensure_future(watcher.take_snapshot(asyncio.get_running_loop()))
    assert await asyncio.to_thread(conn.asked.wait, 5)
    watcher.request_shed("more than 200 graphics events in one second")
    for _attempt in range(100):
        if watcher.closed.is_set():
            break
        await asyncio.sleep(0.01)
    assert watcher.closed.is_set()
    watcher.request_shed("more than 200 graphics events in one second")  # the storm goes on
    await asyncio.sleep(0.05)
    conn.answer.set()
    await asyncio.wait_for(snapshot, 5)  # the questions end, the snapshot returns
    assert conn.deregistered == [(7, False)]  # once, before the answer came
    assert watcher.close_reason is not None
    assert watcher.close_reason.startswith("shedding: libvirt refused a call (libvirtError(")
    assert watcher.callback_id == 7  # never deregistered
    assert watcher.health.state == SHEDDING
