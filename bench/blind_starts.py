"""Measurement 14: sources started during a storm of console sessions, where libvirt's race
(a listener that leaves, or the source's own subscription, while QEMU reports events) can leave
a listener blind. Each start runs the source as shipped (its delivery check at its defaults)
in this process, stops the storm after a random moment, and opens one session: the start
counts as seeing when that session's event arrives (live, or from the snapshot of the new
connection the delivery check opened), and as blind for good when it does not within
``give_up_s``. The storm's rate is counted from the sessions that ran to their end.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from bench.stats import load_average, median
from lab import rfb
from lab.session_storm import SessionStorm
from lab.source_runner import SourceRun

Log = Callable[[str], None]
PROBE_ADDRESS = "127.0.0.3"  # the session after the storm: no storm session (127.0.0.1) shares its address


def measure(lab: Any, log: Log, starts: int = 100, storms: tuple[int, ...] = (2, 8), give_up_s: float = 60.0,
            check: dict[str, float] | None = None) -> dict[str, Any]:
    """``starts`` starts for each storm of ``storms`` clients per console (2 consoles)."""
    [hv] = lab.hypervisors_with_domains("bs", 1, 2)
    try:
        return {"storms": [asyncio.run(one_storm(hv, log, starts, clients, give_up_s, check or {}))
                           for clients in storms]}
    finally:
        lab.release([hv])


async def one_storm(hv: Any, log: Log, starts: int, clients: int, give_up_s: float,
                    check: dict[str, float]) -> dict[str, Any]:
    load = load_average()
    seen_after: list[float] = []
    healed_after: list[float] = []
    blind_for_good = 0
    storm_seconds = 0.0
    storm_sessions = 0
    for _start in range(starts):
        storm = SessionStorm([d.vnc_port for d in hv.domains], clients_per_port=clients)
        sock: socket.socket | None = None
        began = time.monotonic()
        storm.start()
        try:
            async with SourceRun({"uri": hv.uri, **check}) as run:
                await run.wait_for_health(1, state="connected", timeout=give_up_s)
                await asyncio.sleep(random.uniform(0.2, 1.0))
                await asyncio.to_thread(storm.stop)
                storm_seconds += time.monotonic() - began
                storm_sessions += storm.sessions
                sock = await asyncio.to_thread(rfb.open_session, "127.0.0.1", hv.domains[0].vnc_port, 10.0,
                                               (PROBE_ADDRESS, 0))
                opened = time.monotonic()
                try:
                    await run.wait_for(1, remote__node=PROBE_ADDRESS, remote__service=str(sock.getsockname()[1]),
                                       timeout=give_up_s)
                except AssertionError:
                    blind_for_good += 1
                    continue
                after = time.monotonic() - opened
                (healed_after if run.health_matching(state="resynchronised") else seen_after).append(after)
        finally:
            if sock is not None:
                sock.close()
            await asyncio.to_thread(storm.stop)
    result = {"clients_per_console": clients, "starts": starts, "seen_live": len(seen_after),
              "healed": len(healed_after), "blind_for_good": blind_for_good,
              "seen_after_s": seen_after, "healed_after_s": healed_after,
              "sessions_per_s": storm_sessions / storm_seconds if storm_seconds else 0.0,
              "load": load, "load_after": load_average()}
    log(f"#   storm of {clients} clients per console ({result['sessions_per_s']:.0f} sessions/s): "
        f"{starts} starts, {len(seen_after)} saw the session live (p50 {median(seen_after) or 0:.2f} s), "
        f"{len(healed_after)} healed by the delivery check, {blind_for_good} blind for good")
    return result
