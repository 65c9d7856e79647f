"""Bursts of real VNC sessions, and the listener processes that watch them side by side."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lab import rfb

if TYPE_CHECKING:
    from bench.lab import Lab

EVENTS_PER_SESSION = 3  # connect, initialize, disconnect


@dataclass
class Burst:
    sessions: int
    failed: int
    started: float  # wall clock, shared with the listeners (one machine)
    ended: float

    @property
    def expected_events(self) -> int:
        return EVENTS_PER_SESSION * (self.sessions - self.failed)


def run_burst(ports: list[int], sessions: int, concurrency: int = 8, rate: float | None = None) -> Burst:
    """``sessions`` whole RFB 3.8 sessions (handshake, ClientInit, close), spread round-robin
    over the consoles at ``ports``, ``concurrency`` at a time; with ``rate``, session n starts
    no earlier than n / rate seconds after the first (a steady flow instead of a burst)."""
    failures = []
    started = time.time()

    def worker(first: int) -> None:
        for n in range(first, sessions, concurrency):
            if rate:
                delay = started + n / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            try:
                rfb.run_session("127.0.0.1", ports[n % len(ports)])
            except (OSError, ConnectionError) as exc:
                failures.append(exc)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return Burst(sessions, len(failures), started, time.time())


class ListenerProcess:
    """A ``python -m bench.listener`` child, spoken to line by line."""

    def __init__(self, lab: Lab, kind: str, uris: list[str], profile: str | None = None,
                 args: dict[str, Any] | None = None):
        cmd = [sys.executable, "-m", "bench.listener", kind, *uris]
        if profile:
            cmd += ["--profile", profile]
        if args:
            cmd += ["--args", json.dumps(args)]
        self.kind = kind
        self.lab = lab
        self.proc = lab.spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.ready = self.read(timeout=120)

    def read(self, timeout: float = 60) -> dict[str, Any]:
        ready = select.select([self.stdout], [], [], timeout)[0]
        line = self.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the {self.kind} listener did not answer (exit status {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, cmd: str, timeout: float = 60) -> dict[str, Any]:
        self.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.stdin.flush()
        return self.read(timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        try:
            self.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.stdin.flush()
            self.proc.wait(10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.lab.stop_process(self.proc)


def wait_for_events(listeners: list[ListenerProcess], expected: int, quiet: float = 3.0,
                    timeout: float = 120) -> None:
    """Until every listener has ``expected`` events, or nothing new came for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        counts = [listener.ask("count")["count"] for listener in listeners]
        if all(c >= expected for c in counts):
            time.sleep(0.3)  # anything beyond expected (duplicates) shows in the report
            return
        if counts != last:
            last, last_change = counts, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return
        time.sleep(0.1)
