"""A storm of console sessions above the source's ``max_event_rate``: the source sheds the
hypervisor (stops listening to its graphics events, health ``shedding``), so libvirtd queues
nothing for it, then listens again (``resynchronised``) and its snapshot reports the session
that stayed open through the storm. libvirtd's memory is read on the hypervisor (its own /proc) all along. A
dedicated session daemon: the storm must not weigh on other tests' daemons."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import rfb
from lab.hypervisor import SessionHypervisor
from lab.session_storm import SessionStorm
from lab.source_log import SourceLog
from lab.source_runner import SourceRun

pytestmark = pytest.mark.slow

HELD_ADDRESS = "127.0.0.4"  # the session that lives through the storm (the storm's are 127.0.0.1)
LIMIT = 200  # events a second: far below the storm's
STORM_SECONDS = 10.0
SETTLED = ("connected", "resynchronised")  # the health states of a source that listens
# libvirtd may grow by this much at most during the 10 s storm while the source sheds. Not zero:
# its own backlog grows under such a storm whatever listens (about 10 MiB/s with `virsh event`,
# docs/performance.md section 15, so about 100 MiB in 10 s), and up to 74 MiB was seen here with
# the source shedding (a CI run, and 1 of 3 runs alone): the source must stay below virsh's figure.
BOUND_KIB = 96 * 1024


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def stormy() -> Iterator[SessionHypervisor]:
    hv = SessionHypervisor("sh").start()
    try:
        hv.domains = [hv.create_domain(f"{hv.user}-d{n}") for n in range(2)]
        yield hv
    finally:
        hv.stop()


async def test_a_storm_above_the_rate_limit_is_shed_then_resynchronised(
        stormy: SessionHypervisor, source_log: SourceLog):
    hv = stormy
    pid = hv.daemon_pid()
    assert pid is not None
    held: socket.socket | None = await asyncio.to_thread(rfb.open_session, "127.0.0.1", hv.domains[0].vnc_port,
                                                         10.0, (HELD_ADDRESS, 0))
    assert held is not None
    port = str(held.getsockname()[1])
    storm = SessionStorm([d.vnc_port for d in hv.domains])
    samples: list[int] = []
    try:
        args = {"uri": hv.uri, "max_event_rate": LIMIT, "shed_seconds": 2, "heartbeat_interval": 0}
        async with SourceRun(args) as run:
            await run.wait_for(1, remote__node=HELD_ADDRESS, remote__service=port, snapshot=True, timeout=60)
            before = rss_kib(pid)
            started = time.monotonic()
            storm.start()
            [shed] = await run.wait_for_health(1, state="shedding", changed=True, timeout=30)
            while time.monotonic() - started < STORM_SECONDS:
                samples.append(rss_kib(pid))
                await asyncio.sleep(0.25)
            await asyncio.to_thread(storm.stop)
            rate = storm.sessions / (time.monotonic() - started)
            # The storm may have been shed more than once, and libvirtd may have dropped the
            # connection meanwhile (keepalive) so that the source connected again: either way
            # it settles in a healthy state, and the snapshot that follows (its events come
            # after the health event) reports the held session.
            deadline = time.monotonic() + 60
            while True:
                last = max(i for i, e in enumerate(run.health) if e["changed"])
                if run.health[last]["state"] in SETTLED:
                    break
                assert time.monotonic() < deadline, f"not settled after the storm: {run.health[-3:]}"
                await asyncio.sleep(0.2)
            before_settled = run.events[:run.events_before_health[last]]
            mark = sum(e["remote"]["node"] == HELD_ADDRESS and e["remote"]["service"] == port and e["snapshot"]
                       for e in before_settled)
            await run.wait_for(mark + 1, remote__node=HELD_ADDRESS, remote__service=port, snapshot=True, timeout=60)
            seen = run.matching(remote__node=HELD_ADDRESS, remote__service=port)
            held.close()
            held = None
            [end] = await run.wait_for(1, remote__node=HELD_ADDRESS, remote__service=port, phase="disconnect",
                                       timeout=60)
            trail = [(e["state"], e["previous"], e["reason"]) for e in run.health if e["changed"]]
    finally:
        if held is not None:
            held.close()
        await asyncio.to_thread(storm.stop)
    assert rate * 3 > LIMIT, f"the storm ({rate:.0f} sessions/s) stayed below the limit"
    assert shed["previous"] in ("connected", "resynchronised")
    assert shed["reason"] == f"more than {LIMIT} graphics events in one second: not listening for 2s"
    # out of shedding by listening again, or by connecting again when libvirtd dropped the connection
    resyncs = [reason for state, previous, reason in trail if state == "resynchronised" and previous == "shedding"]
    assert resyncs, trail
    assert all(r.startswith(("listening again after shedding ", "connected again after shedding ")) for r in resyncs), \
        resyncs
    # never a false end of the held session: every event of it before it closed says it is on
    assert len(seen) >= 2 and all(e["phase"] == "initialize" and e["snapshot"] for e in seen), \
        ([(e["phase"], e.get("ended_by"), e["snapshot"]) for e in seen], trail)
    assert end["session"]["id"] == seen[0]["session"]["id"]
    assert max(samples) - before < BOUND_KIB, (before, max(samples))
    assert source_log.messages(hv.uri, "shedding: more than 200 graphics events in one second")
