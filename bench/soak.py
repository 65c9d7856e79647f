"""Measurement 5: the source's memory across a long run. ``python -m bench.soak`` prints one
JSON line.

A million real VNC sessions' events would take hours here, so this soak drives the source's
own libvirt callback, ``HypervisorWatcher.on_graphics``, with synthetic arguments shaped like
libvirt's (domain objects answering name/UUIDString/ID, address dicts, subjects), in the
source's process and loop; everything after the callback is the real code path: the buffer,
``feed()``, the payload mapping and session tracking, an ``asyncio.Queue(maxsize=1)`` and a
consumer. The consumer alternates between draining and stalling, so the buffer fills up to
``--stall-events`` and drains again. RSS is sampled along the way. At the end, a stall longer
than ``max_buffered_events`` checks the buffer bound: events past it are refused and counted
(the source then resynchronises that hypervisor by snapshot), never held.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
import uuid
from typing import Any

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import EventBuffer
from ansible_collections.virtguard.console.plugins.plugin_utils.hypervisor_watcher import HypervisorWatcher, feed
from ansible_collections.virtguard.console.plugins.plugin_utils.source_arguments import SourceArguments
from bench.stats import rss_kib
from lab.source_runner import FakeDomain

URI = "qemu+unix:///session?socket=/nonexistent/bench-soak"


class Soak:
    def __init__(self, limit: int):
        # the buffer is measured: events come far faster than max_event_rate, never shed; only
        # graphics events are counted, so no busy heartbeat joins them
        config = SourceArguments({"uri": URI, "max_buffered_events": limit, "max_event_rate": 0,
                                  "busy_heartbeat_delay": 0})
        self.buffer = EventBuffer(config.max_buffered_events, asyncio.get_running_loop())
        self.watcher = HypervisorWatcher(URI, config, self.buffer)
        self.watcher.hypervisor = {"uri": URI, "hostname": "bench-soak"}
        self.feed = feed
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.consumed = 0
        self.injected = 0
        self.sessions = 0
        self.max_buffered = 0
        self.domains = [FakeDomain(f"soak-d{n}", n + 1, str(uuid.UUID(int=n + 1))) for n in range(4)]
        self.local = {"family": 0, "node": "127.0.0.1", "service": "5900"}

    async def consume(self) -> None:
        while True:
            if not self.flowing.is_set():
                await self.flowing.wait()
            await self.queue.get()
            self.consumed += 1

    async def inject(self, events: int, keep_up: bool) -> None:
        """Whole sessions (connect, initialize, disconnect), a few per loop turn as libvirt
        delivers them; ``keep_up`` waits for the feeder when it falls behind (a steady flow)."""
        on_graphics = self.watcher.on_graphics
        for _session in range(max(1, (events + 2) // 3)):  # whole sessions, at least one
            n = self.sessions
            self.sessions += 1
            dom = self.domains[n % len(self.domains)]
            remote = {"family": 0, "node": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                      "service": str(1024 + n % 60000)}
            subject = [("saslUsername", f"user{n % 97}")]
            on_graphics(None, dom, 0, self.local, remote, "sasl", [], None)
            on_graphics(None, dom, 1, self.local, remote, "sasl", subject, None)
            on_graphics(None, dom, 2, self.local, remote, "sasl", subject, None)
            self.injected += 3
            if n % 10 == 0:
                self.max_buffered = max(self.max_buffered, len(self.buffer))
                await asyncio.sleep(0)
                while keep_up and len(self.buffer) > 300:
                    await asyncio.sleep(0)

    async def drained(self) -> None:
        while len(self.buffer) or self.consumed + self.watcher.dropped < self.injected:
            await asyncio.sleep(0.001)


async def run(total: int, stall_events: int, flow_events: int, limit: int, sample_every: int,
              profile: str | None, trace_cycles: int = 3) -> dict[str, Any]:
    soak = Soak(limit)
    feeder = asyncio.create_task(soak.feed(soak.queue, soak.buffer))
    consumer = asyncio.create_task(soak.consume())
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    samples = []  # (events so far, RSS KiB, what)
    cycles = 0
    started = time.monotonic()
    cpu0 = time.process_time()
    flow_time = flow_count = 0.0
    while soak.injected < total:
        # steady flow, sampled every sample_every events
        goal = min(total, soak.injected + flow_events)
        while soak.injected < goal:
            t0, before = time.monotonic(), soak.consumed
            await soak.inject(min(sample_every, goal - soak.injected), keep_up=True)
            await soak.drained()
            flow_time += time.monotonic() - t0
            flow_count += soak.consumed - before
            samples.append((soak.injected, rss_kib(), "flow"))
        if soak.injected >= total:
            break
        # the consumer stalls; the buffer holds the burst; then it drains
        soak.flowing.clear()
        await soak.inject(min(stall_events, total - soak.injected), keep_up=False)
        samples.append((soak.injected, rss_kib(), f"stalled, {len(soak.buffer)} buffered"))
        soak.flowing.set()
        await soak.drained()
        samples.append((soak.injected, rss_kib(), "drained"))
        cycles += 1
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu0
    if profiler and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    soaked = soak.injected  # the soak proper; the bound check and the traced cycles come on top
    lost = soak.injected - soak.consumed - soak.watcher.dropped
    dropped_in_soak = soak.watcher.dropped

    # the bound: a stall longer than the buffer
    bound = {"limit": limit}
    soak.flowing.clear()
    before_injected, before_consumed = soak.injected, soak.consumed
    soak.max_buffered = 0
    await soak.inject(limit + limit // 10, keep_up=False)
    bound.update(injected=soak.injected - before_injected, max_buffered=soak.max_buffered,
                 buffered_at_end=len(soak.buffer), refused_and_counted=soak.watcher.dropped - dropped_in_soak,
                 paused=soak.watcher.overflowed, rss_kib=rss_kib())
    soak.flowing.set()
    await soak.drained()
    bound["lost"] = soak.injected - soak.consumed - soak.watcher.dropped
    bound["consumed"] = soak.consumed - before_consumed
    bound["holds"] = (bound["max_buffered"] <= limit and bound["paused"] and bound["lost"] == 0
                      and bound["refused_and_counted"] == bound["injected"] - bound["consumed"])
    # resume the paused hypervisor as the watcher does once drained (its snapshot aside), then
    # look at live memory with tracemalloc, last: tracemalloc's own tables would inflate RSS
    soak.watcher.overflowed = False
    before_dropped = soak.watcher.dropped
    traced = await live_memory_across_stalls(soak, trace_cycles, stall_events)
    if soak.watcher.dropped != before_dropped:
        raise RuntimeError("the traced cycles overflowed the buffer: lower --stall-events")
    feeder.cancel()
    consumer.cancel()

    # "warm": after the first stall and drain (the largest the buffer gets). Flatness compares
    # the samples taken with the buffer empty; the stalled ones hold the buffered events on top.
    warm_index = next((i for i, s in enumerate(samples) if s[2] == "drained"), 0)
    warm = [s for s in samples[warm_index:] if not s[2].startswith("stalled")]
    baseline = warm[0][1]
    deviation = max(abs(s[1] - baseline) for s in warm) / baseline
    stalled = [s[1] for s in samples if s[2].startswith("stalled")]
    return {
        "events": soaked, "consumed": soak.consumed, "lost": lost,
        "dropped": dropped_in_soak, "stall_cycles": cycles, "stall_events": stall_events,
        "elapsed_s": elapsed, "cpu_s": cpu,
        "flow_events_per_s": flow_count / flow_time if flow_time else None,
        "cpu_us_per_event": 1e6 * cpu / max(1, soaked),
        "rss_first_kib": samples[0][1], "rss_warm_kib": baseline,
        "rss_min_warm_kib": min(s[1] for s in warm), "rss_max_warm_kib": max(s[1] for s in warm),
        "rss_deviation": deviation, "rss_stalled_max_kib": max(stalled) if stalled else None,
        "samples": samples, "bound": bound, "traced_kib_after_drain": traced,
    }


async def live_memory_across_stalls(soak: Soak, cycles: int, stall_events: int) -> list[float]:
    """What RSS cannot tell apart: whether memory that stays after a stall is still reachable.
    Python's live allocations (tracemalloc), after each of ``cycles`` more stall-and-drain
    cycles and a flow, with garbage collected; flat means nothing is kept."""
    if not cycles:
        return []
    traced = []
    tracemalloc.start()
    try:
        for _cycle in range(cycles + 1):  # the first cycle warms tracemalloc's own tables
            soak.flowing.clear()
            await soak.inject(stall_events, keep_up=False)
            soak.flowing.set()
            await soak.drained()
            await soak.inject(stall_events // 2, keep_up=True)
            await soak.drained()
            gc.collect()
            traced.append(tracemalloc.get_traced_memory()[0] / 1024)
    finally:
        tracemalloc.stop()
    return traced[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description="the source's memory across a long run (synthetic callbacks)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--stall-events", type=int, default=60_000)
    parser.add_argument("--flow-events", type=int, default=150_000)
    parser.add_argument("--limit", type=int, default=100_000, help="max_buffered_events (the source's default)")
    parser.add_argument("--sample-every", type=int, default=30_000)
    parser.add_argument("--profile")
    parser.add_argument("--trace-cycles", type=int, default=3,
                        help="stall cycles after the soak with tracemalloc on (live memory), default 3")
    options = parser.parse_args()
    result = asyncio.run(run(options.events, options.stall_events, options.flow_events, options.limit,
                             options.sample_every, options.profile, options.trace_cycles))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
