"""Measurement 10: the source's memory across reconnections. One source watches a real session
daemon that is stopped and started again round after round; each round a real VNC session is
opened and closed on the new connection, and its three events must arrive. The source runs in a
child (``python -m bench.reconnect URI CONSOLE_PORT ROUNDS``) so that its RSS is its own; the
parent restarts the daemon whenever the child asks, and reads one JSON line per round.

Each round is one reconnection and, while the daemon is down, a few failed attempts (every
``reconnect_delay``). Python's live memory blocks (``sys.getallocatedblocks`` after a
collection) and RSS are sampled at the end of each round; what a reconnection keeps is the
slope over the rounds after the first few (allocator warm-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import statistics
import subprocess
import sys
from typing import Any

from bench.lab import Lab
from bench.stats import rss_kib
from lab import rfb
from lab.source_runner import SourceRun

WARM_ROUNDS = 5
SUBSCRIBED = "watching graphics events"


class Subscriptions(logging.Handler):
    """Counts the source's "watching graphics events" log lines: one per (re)connection."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if SUBSCRIBED in record.getMessage():
            self.count += 1


async def until(predicate: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("the source did not reconnect")
        await asyncio.sleep(0.05)


async def child(uri: str, console_port: int, rounds: int) -> None:
    subscriptions = Subscriptions()
    logger = logging.getLogger("virtguard.console.libvirt_graphics")
    logger.addHandler(subscriptions)
    logger.setLevel(logging.INFO)
    args = {"uri": uri, "snapshot": False, "reconnect_delay": 0.2, "reconnect_max_delay": 0.5,
            "keepalive_interval": 1}
    async with SourceRun(args) as run:
        for n in range(rounds):
            await until(lambda n=n: subscriptions.count > n, 60)
            await asyncio.to_thread(rfb.run_session, "127.0.0.1", console_port)
            with contextlib.suppress(AssertionError):  # too few in time: reported as lost
                await run.wait_for(3, timeout=30, snapshot=False)
            seen = len(run.events)
            run.events.clear()
            gc.collect()
            print(json.dumps({"round": n, "events": seen, "blocks": sys.getallocatedblocks(), "rss_kib": rss_kib()}),
                  flush=True)
            if n + 1 < rounds:
                print("restart", flush=True)
                sys.stdin.readline()


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (round, value)."""
    return statistics.linear_regression([x for x, _y in points], [y for _x, y in points]).slope


def measure(lab: Lab, log: Any, rounds: int) -> dict[str, Any]:
    [hv] = lab.hypervisors_with_domains("rc", 1, 1)
    proc = lab.spawn([sys.executable, "-m", "bench.reconnect", hv.uri, str(hv.domains[0].vnc_port), str(rounds)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    samples: list[dict[str, Any]] = []
    try:
        for line in proc.stdout:
            if line.strip() == "restart":
                hv.stop_daemon()
                hv.start_daemon()
                proc.stdin.write("ok\n")
                proc.stdin.flush()
            elif line.startswith("{"):
                samples.append(json.loads(line))
                if len(samples) % 10 == 0:
                    log(f"#   round {len(samples)}/{rounds}: {samples[-1]['blocks']} blocks, "
                        f"RSS {samples[-1]['rss_kib']} KiB")
    finally:
        lab.stop_process(proc)
        lab.release([hv])
    if len(samples) < rounds:
        raise RuntimeError(f"the reconnection child stopped after {len(samples)} of {rounds} rounds")
    warm = samples[WARM_ROUNDS:]
    return {
        "rounds": rounds,
        "lost": sum(max(0, 3 - s["events"]) for s in samples),
        "blocks_per_reconnection": slope([(s["round"], s["blocks"]) for s in warm]),
        "rss_kib_per_reconnection": slope([(s["round"], s["rss_kib"]) for s in warm]),
        "rss_first_kib": samples[0]["rss_kib"], "rss_last_kib": samples[-1]["rss_kib"],
        "samples": samples,
    }


if __name__ == "__main__":
    asyncio.run(child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
