"""Small numeric helpers shared by the measurements."""

from __future__ import annotations

import os
import statistics
import threading
import time


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(pct / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process, KiB (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mem_available_mib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds of each Python thread of this process, by native thread id."""
    cpu: dict[int, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None or thread.native_id is None:  # not started yet
            continue
        try:
            cpu[thread.native_id] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except OSError:  # ended meanwhile
            continue
    return cpu
