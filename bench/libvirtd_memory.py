"""Measurement 15: libvirtd's memory under a storm of console sessions, side by side in one run
with no listener, with ``virsh event --all --loop`` and with the event source (as shipped: it
sheds a hypervisor whose graphics events come faster than ``max_event_rate``). libvirt queues
events for a listener that reads slower than they come without bound; what that costs is read
on the hypervisor, from libvirtd's own /proc, every second. Each listener gets a fresh session
daemon (its memory starts from the same place), the same consoles and the same storm
(lab.session_storm, in this process); the source runs in a process of its own
(bench.fleet_source), its queue drained as an activation's would be.

``firewalled`` is the source again, with the console firewall's total rate limit
(``rate_total``, module_utils.console_firewall_ruleset) on the consoles' ports in this machine's
nftables, 127.0.0.1 and ::1 allowed: what an operator sets to keep a storm from inside the allowed
networks from reaching QEMU at all. Its table (``vgbenchfw<pid>``) is removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_ruleset import make_spec
from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_table import FirewallTable
from bench import ROOT
from bench.stats import load_average, rss_kib
from lab.session_storm import SessionStorm

Log = Callable[[str], None]
MODES = ("none", "virsh", "source", "firewalled")
# Not run by default: virsh listening to lifecycle events only (does a listener of another event
# type cost libvirtd as much? libvirt queues every domain event while any callback is registered).
MORE_MODES = ("virsh_lifecycle",)
FIREWALL_TABLE = f"vgbenchfw{os.getpid()}"


def measure(lab: Any, log: Log, seconds: float = 300.0, clients: int = 16, consoles: int = 4,
            modes: tuple[str, ...] = MODES, source_args: dict[str, Any] | None = None,
            rate_total: int = 200) -> dict[str, Any]:
    result: dict[str, Any] = {"seconds": seconds, "clients_per_console": clients, "consoles": consoles,
                              "source_args": source_args or {}, "rate_total": rate_total}
    for mode in modes:
        [hv] = lab.hypervisors_with_domains(f"lm{mode[0]}", 1, consoles)
        try:
            result[mode] = one_listener(lab, hv, mode, seconds, clients, log, source_args or {},
                                        rate_total if mode == "firewalled" else 0)
        finally:
            lab.release([hv])
    return result


def run_here(argv: list[str], data: str | None = None) -> tuple[int, str, str]:
    """The firewall table's runner, in the bench's own network namespace (never the machine's
    nftables: bench/__main__.py enters it first, as the test suite does)."""
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def apply_firewall(table: FirewallTable, ports: list[int], rate_total: int) -> None:
    """The console firewall's table on the session hypervisors' ``ports``: 127.0.0.1 and ::1
    allowed, at most ``rate_total`` new connections a second."""
    table.apply(make_spec(table.table, -20, ["127.0.0.1", "::1"], [(p, p) for p in ports], 0, rate_total))


class SourceProcess:
    """bench.fleet_source on one URI: counts its graphics events and its health changes."""

    def __init__(self, lab: Any, uri: str, workdir: Path, source_args: dict[str, Any]) -> None:
        args = workdir / "source_args.json"
        args.write_text(json.dumps({"uri": uri, **source_args}))
        self.proc = lab.spawn([sys.executable, "-m", "bench.fleet_source", str(args)], stdout=subprocess.PIPE,
                              text=True)
        self.events = 0
        self.health: list[str] = []
        self.watching = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = json.loads(line)
            if "phase" in record:
                self.events += 1
            elif "health" in record:
                self.health.append(record["health"])
            elif record.get("log") == "watching":
                self.watching.set()


def one_listener(lab: Any, hv: Any, mode: str, seconds: float, clients: int, log: Log,
                 source_args: dict[str, Any], rate_total: int) -> dict[str, Any]:
    if not rate_total:
        return storm_beside(lab, hv, mode, seconds, clients, log, source_args)
    table = FirewallTable(run_here, FIREWALL_TABLE)
    try:  # removed also when the table was written and then found wrong
        apply_firewall(table, [d.vnc_port for d in hv.domains], rate_total)
        row = storm_beside(lab, hv, mode, seconds, clients, log, source_args)
    finally:
        counts = table.remove()
    row.update(rate_total=rate_total, rate_limited_attempts=counts["rate_limited_attempts"],
               allowed_attempts=counts["allowed_attempts"])
    log(f"#   the firewall let {row['allowed_attempts']} new connections through "
        f"({row['allowed_attempts'] / row['storm_seconds']:.0f} a second) and refused "
        f"{row['rate_limited_attempts']} over its limit of {rate_total} a second")
    return row


def storm_beside(lab: Any, hv: Any, mode: str, seconds: float, clients: int, log: Log,
                 source_args: dict[str, Any]) -> dict[str, Any]:
    pid = hv.daemon_pid()
    assert pid is not None, "the session daemon runs"
    source: SourceProcess | None = None
    proc: subprocess.Popen[Any] | None = None
    with tempfile.TemporaryDirectory(prefix="vgt-bench-libvirtd-memory-", dir=ROOT / "build") as tmp:
        if mode in ("virsh", "virsh_lifecycle"):
            events = ["--all"] if mode == "virsh" else ["--event", "lifecycle"]
            proc = lab.spawn(["virsh", "-c", hv.uri, "event", *events, "--loop"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            time.sleep(3)  # registered (virsh does not say when)
        elif mode in ("source", "firewalled"):
            source = SourceProcess(lab, hv.uri, Path(tmp), source_args)
            proc = source.proc
            if not source.watching.wait(60):
                raise RuntimeError("the source did not start watching")
            time.sleep(2)  # its snapshot
        load = load_average()
        before = rss_kib(pid)
        storm = SessionStorm([d.vnc_port for d in hv.domains], clients_per_port=clients)
        samples: list[int] = []
        exited: float | None = None  # when the listener's process ended (libvirtd dropped virsh, say)
        started = time.monotonic()
        storm.start()
        try:
            # the storm lasts its whole time whatever the listener does: a listener that libvirtd
            # dropped is part of what each listener costs the daemon
            while time.monotonic() - started < seconds:
                samples.append(rss_kib(pid))
                time.sleep(1.0)
                if exited is None and proc is not None and proc.poll() is not None:
                    exited = time.monotonic() - started
        finally:
            storm.stop()
        stormed = time.monotonic() - started
        time.sleep(5)
        after = rss_kib(pid)
        alive = proc is None or proc.poll() is None
        if proc is not None:
            lab.stop_process(proc)
    row = {"rss_before_kib": before, "rss_max_kib": max(samples or [before]), "rss_after_kib": after,
           "rss_at_kib": {str(t): samples[t - 1] for t in (10, 30, 60, 120, 300) if t <= len(samples)},
           "sessions": storm.sessions, "sessions_per_s": storm.sessions / stormed if stormed else 0.0,
           "storm_seconds": stormed, "listener_alive": alive, "listener_exited_after_s": exited, "load": load,
           "load_after": load_average()}
    if source is not None:
        row.update(events=source.events, shed=source.health.count("shedding"),
                   resynchronised=source.health.count("resynchronised"), health=source.health)
    peak = max(samples or [before])
    log(f"#   {mode}: libvirtd {before / 1024:.0f} MiB before, at most {peak / 1024:.0f} MiB in "
        f"{stormed:.0f} s of {row['sessions_per_s']:.0f} sessions/s, {after / 1024:.0f} MiB 5 s after"
        + (f"; the listener exited after {exited:.0f} s" if exited is not None else "")
        + (f"; the source shed {row['shed']} times, {row['events']} events" if source is not None else ""))
    return row
