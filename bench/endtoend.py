"""Measurement 2: the same bursts through ansible-rulebook with the shipped audit rulebook
(console_audit.yml: the source, the classify filter writing the audit log, its rule), against
the engine's own ceiling: the same rulebook with the source replaced by bench_replay, which
feeds pre-built payloads as fast as the engine takes them.

Both activations run at once and take turns (a ceiling round and a real burst, in alternating
order), so each pair of figures comes from the same minutes of the machine. Every event of either rulebook is
one record in its audit log (the filter writes it before the event enters the engine's
one-slot queue, so records are written at the pace the engine consumes); the rate is records
over the time from the first record to the last of a round.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench import ROOT
from bench.audit_tail import AuditTail
from bench.burst import run_burst
from bench.stats import median
from lab.rulebook_runner import VENV_BIN, local_inventory

if TYPE_CHECKING:
    from bench.lab import BenchHypervisor, Lab

RULEBOOK = ROOT / "extensions" / "eda" / "rulebooks" / "console_audit.yml"
SOURCE_NAME = "virtguard.console.libvirt_graphics"
WARM_ROUNDS = 2


class Activation:
    """One ansible-rulebook process (in its own process group, stopped by the Lab)."""

    def __init__(self, lab: Lab, name: str, rulebook: str, variables: dict[str, Any], workdir: Path,
                 extra_args: tuple[str, ...] = (), profile: str | None = None):
        self.lab = lab
        self.name = name
        self.workdir = workdir
        self.audit_log = workdir / f"{name}-audit.jsonl"
        self.log_path = workdir / f"{name}.log"
        vars_file = workdir / f"{name}-vars.yml"
        inventory = workdir / "inventory.yml"
        vars_file.write_text(yaml.safe_dump({**variables, "virtguard_audit_log": str(self.audit_log)}))
        inventory.write_text(yaml.safe_dump(local_inventory()))
        # open as long as the activation runs; stop() closes it
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.profile = profile
        wrapper = [sys.executable, "-m", "bench.profiled", profile] if profile else []
        self.proc = lab.spawn([*wrapper, str(VENV_BIN / "ansible-rulebook"), "-r", rulebook, "-i", str(inventory),
                               "--vars", str(vars_file), "-v", *extra_args],
                              cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
                              env={"ANSIBLE_COLLECTIONS_PATH": str(ROOT / "build" / "collections"),
                                   "ANSIBLE_LOCALHOST_WARNING": "false"})

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ansible-rulebook ({self.name}) exited:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {text!r} from ansible-rulebook ({self.name}) after {timeout}s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.profile and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(3)
        self.lab.stop_process(self.proc)
        self.log.close()


def ceiling_rulebook(workdir: Path, events: int, trigger_dir: Path) -> Path:
    """console_audit.yml with bench_replay in place of the source; filters and rules as shipped."""
    rulebook = yaml.safe_load(RULEBOOK.read_text())
    for ruleset in rulebook:
        for source in ruleset["sources"]:
            if SOURCE_NAME in source:
                del source[SOURCE_NAME]
                source["bench_replay"] = {"events": events, "trigger_dir": str(trigger_dir)}
    path = workdir / "ceiling_rulebook.yml"
    path.write_text(yaml.safe_dump(rulebook, sort_keys=False))
    return path


def end_to_end(lab: Lab, hypervisors: list[BenchHypervisor], rounds: int, sessions: int, concurrency: int,
               log: Callable[[str], object] = print,
               profile: str | None = None) -> dict[str, Any]:
    workdir = ROOT / "build" / "bench" / f"e2e-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    triggers = workdir / "triggers"
    triggers.mkdir(exist_ok=True)
    uris = [hv.uri for hv in hypervisors]
    ports = [d.vnc_port for hv in hypervisors for d in hv.domains]
    expected = 3 * sessions
    ceiling = Activation(lab, "ceiling", str(ceiling_rulebook(workdir, expected, triggers)), {"virtguard_uri": uris},
                         workdir, ("-S", str(ROOT / "bench" / "eda_sources")))
    # the source's capacity is measured: it must not shed a burst it keeps up with
    real = Activation(lab, "real", "virtguard.console.console_audit",
                      {"virtguard_uri": uris, "virtguard_max_event_rate": 0}, workdir,
                      profile=profile and str(Path(profile) / "activation_real.prof"))
    rows = []
    try:
        ceiling.wait_for_log("bench_replay: ready")
        real.wait_for_log("watching graphics events", count=len(uris))
        time.sleep(1)
        # warm-up of both, not counted: the engine's JVM compiles for thousands of events
        # (its compiler threads took up to 80 us of CPU per event in the first rounds of 6 000
        # here, competing for the cores), so each activation takes WARM_ROUNDS rounds first
        real_tail, ceiling_tail = AuditTail(real.audit_log), AuditTail(ceiling.audit_log)
        for n in range(WARM_ROUNDS):
            (triggers / f"go-{n + 1}").touch()
            warm = run_burst(ports, sessions, concurrency)
            wait_for_records(real_tail, warm.expected_events)
            wait_for_records(ceiling_tail, expected)
        for n in range(rounds):
            # alternate which goes first, so that a drift of the machine (or the engine's JIT
            # warming up) across a round favours neither
            order = ("ceiling", "real") if n % 2 == 0 else ("real", "ceiling")
            for turn in order:
                if turn == "ceiling":
                    cpu_before = process_cpu_s(ceiling.proc.pid)
                    (triggers / f"go-{WARM_ROUNDS + n + 1}").touch()
                    ceiling_records = wait_for_records(ceiling_tail, expected)
                    ceiling_cpu = cpu_us_per_event(cpu_before, process_cpu_s(ceiling.proc.pid), len(ceiling_records))
                    continue
                # live: the activation takes the burst as it comes (rate bounded by the arrivals)
                burst = run_burst(ports, sessions, concurrency)
                live_records = wait_for_records(real_tail, burst.expected_events)
                # backlog: the activation is stopped (SIGSTOP) during the burst, so the whole burst
                # waits in libvirt's socket and the activation empties it at its own pace
                os.kill(real.proc.pid, signal.SIGSTOP)
                try:
                    stopped_burst = run_burst(ports, sessions, concurrency)
                    time.sleep(0.5)
                finally:
                    cpu_before = process_cpu_s(real.proc.pid)
                    os.kill(real.proc.pid, signal.SIGCONT)
                real_records = wait_for_records(real_tail, stopped_burst.expected_events)
                real_cpu = cpu_us_per_event(cpu_before, process_cpu_s(real.proc.pid), len(real_records))
            row: dict[str, Any] = {
                "round": n + 1,
                "first": order[0],
                "ceiling_events": len(ceiling_records),
                "ceiling_lost": expected - len(ceiling_records),
                "ceiling_eps": rate(ceiling_records),
                "failed_sessions": burst.failed + stopped_burst.failed,
                "live_events": len(live_records),
                "live_eps": rate(live_records),
                "expected": stopped_burst.expected_events,
                "real_events": len(real_records),
                "real_eps": rate(real_records),
                "ceiling_cpu_us": ceiling_cpu,
                "real_cpu_us": real_cpu,
            }
            row["real_lost"] = (_lost(live_records, burst.expected_events)
                                + _lost(real_records, stopped_burst.expected_events))
            row["real_duplicates"] = _duplicates(live_records) + _duplicates(real_records)
            row["ratio"] = row["real_eps"] / row["ceiling_eps"] if row["ceiling_eps"] else 0.0
            rows.append(row)
            log(f"#   round {n + 1}/{rounds} ({order[0]} first): "
                f"ceiling {row['ceiling_events']} ev {row['ceiling_eps']:.0f}/s; "
                f"source live {row['live_events']} ev {row['live_eps']:.0f}/s, backlog {row['real_events']} ev "
                f"{row['real_eps']:.0f}/s, ratio {row['ratio']:.3f}; lost {row['real_lost']}")
    finally:
        real.stop()
        ceiling.stop()
    ratios = [r["ratio"] for r in rows]
    return {
        "rows": rows, "sessions": sessions, "uris": len(uris), "domains": len(ports),
        "ratio_median": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ceiling_eps_median": median([r["ceiling_eps"] for r in rows]),
        "real_eps_median": median([r["real_eps"] for r in rows]),
        "live_eps_median": median([r["live_eps"] for r in rows]),
        "ceiling_cpu_us_median": {part: median([r["ceiling_cpu_us"][part] for r in rows])
                                  for part in rows[0]["ceiling_cpu_us"]},
        "real_cpu_us_median": {part: median([r["real_cpu_us"][part] for r in rows]) for part in rows[0]["real_cpu_us"]},
        "lost": sum(r["real_lost"] for r in rows), "duplicates": sum(r["real_duplicates"] for r in rows),
        "ceiling_lost": sum(r["ceiling_lost"] for r in rows),
        "workdir": str(workdir),
    }


def _session_phases(records: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """An event seen twice has the same session, phase and callback time (two sessions may
    share an id when a client port is reused, not the microsecond of a callback)."""
    return {(r["graphics"]["session"]["id"], r["graphics"]["phase"], r["graphics"]["timestamp"]) for r in records}


def _lost(records: list[dict[str, Any]], expected: int) -> int:
    return max(0, expected - len(_session_phases(records)))


def _duplicates(records: list[dict[str, Any]]) -> int:
    return len(records) - len(_session_phases(records))


def process_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of an activation's threads: the main thread (the asyncio loop and the
    engine's Python side), its other Python threads (libvirt's event thread when the source
    runs; executors) and the JVM's threads (the rules engine, its compiler and collector)."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {"main": 0.0, "python_threads": 0.0, "jvm": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                comm, rest = stat.read().split("(", 1)[1].rsplit(")", 1)
        except OSError:  # the thread ended meanwhile
            continue
        fields = rest.split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        if int(tid) == pid:
            cpu["main"] += seconds
        elif comm.startswith("ansible-rule"):  # Python threads keep the process's name
            cpu["python_threads"] += seconds
        else:
            cpu["jvm"] += seconds
    return cpu


def cpu_us_per_event(before: dict[str, Any], after: dict[str, Any], events: int) -> dict[str, Any]:
    return {part: 1e6 * (after[part] - before[part]) / max(1, events) for part in after}


def wait_for_records(tail: AuditTail, count: int, quiet: float = 5.0, timeout: float = 300) -> list[dict[str, Any]]:
    """The next ``count`` records (and any beyond that arrive within half a second, so that a
    duplicate shows), or fewer when nothing new comes for ``quiet`` seconds."""
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        new = tail.read_new()
        if new:
            records += new
            last_change = time.monotonic()
        if len(records) >= count:
            time.sleep(0.5)
            return records + tail.read_new()
        if time.monotonic() - last_change > quiet:
            return records
        time.sleep(0.2)
    return records


def rate(records: list[dict[str, Any]]) -> float:
    times = [datetime.datetime.fromisoformat(r["time"]).timestamp() for r in records]
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (max(times) - min(times))
