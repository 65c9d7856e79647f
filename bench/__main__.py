"""``python -m bench``: measure the event source and print its figures, each with its goal.

Exits 1 when any measurement lost an event (or 2 when the bench itself failed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.lab import Lab
from bench.libvirtd_memory import MODES as MEMORY_MODES
from bench.libvirtd_memory import MORE_MODES as MORE_MEMORY_MODES
from bench.stats import load_average, median, mem_available_mib

MEASUREMENTS = ("burst", "endtoend", "scale", "soak", "audit", "storm", "fleet", "reconnect", "resilience",
                "blind_starts", "libvirtd_memory", "second_run")
# Real resident memory of one tiny paused TCG domain here (MemAvailable drop per domain),
# plus the daemons' share: the scale test is sized down when the machine has less to spare.
MIB_PER_DOMAIN = 18
MEMORY_RESERVE_MIB = 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="The event source's performance figures, side by side with their references "
                    "(docs/performance.md). Builds and removes its own session daemons and domains.")
    parser.add_argument("--only", action="append", choices=MEASUREMENTS,
                        help="run only these measurements (repeatable); default all")
    parser.add_argument("--bursts", type=int, default=5, help="bursts in the side-by-side run (default 5)")
    parser.add_argument("--sessions", type=int, default=2000, help="RFB sessions per burst (default 2000)")
    parser.add_argument("--burst-hypervisors", type=int, default=2,
                        help="session daemons the bursts go to (default 2)")
    parser.add_argument("--burst-domains", type=int, default=2, help="domains per burst hypervisor (default 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="sessions in flight in a burst (default 8)")
    parser.add_argument("--paced-sessions", type=int, default=1500,
                        help="sessions of the steady flow after the bursts, for the added latency "
                             "(default 1500; 0: none)")
    parser.add_argument("--paced-rate", type=float, default=500,
                        help="sessions per second in the steady flow (default 500, 1,500 events/s)")
    parser.add_argument("--e2e-sessions", type=int, default=2000,
                        help="RFB sessions per round through ansible-rulebook (default 2000)")
    parser.add_argument("--e2e-rounds", type=int, default=5,
                        help="rounds (a ceiling round and a real burst, alternating which goes first) "
                             "through ansible-rulebook (default 5)")
    parser.add_argument("--scale-runs", type=int, default=3, help="source starts in the scale run (default 3)")
    parser.add_argument("--scale-hypervisors", type=int, default=8, help="hypervisors in the scale run (default 8)")
    parser.add_argument("--scale-domains", type=int, default=100,
                        help="running domains per hypervisor in the scale run (default 100; reduced "
                             "automatically when memory is short, and said so)")
    parser.add_argument("--soak-events", type=int, default=1_000_000,
                        help="events driven through the source in the soak (default 1,000,000)")
    parser.add_argument("--soak-stall-events", type=int, default=60_000,
                        help="events the buffer holds while the soak's consumer stalls (default 60,000)")
    parser.add_argument("--soak-flow-events", type=int, default=150_000,
                        help="events between two stalls in the soak (default 150,000)")
    parser.add_argument("--soak-limit", type=int, default=100_000,
                        help="max_buffered_events in the soak (default 100,000, the source's default)")
    parser.add_argument("--audit-events", type=int, default=100_000,
                        help="records for the audit writer (default 100,000)")
    parser.add_argument("--storm-addresses", type=int, default=200,
                        help="untrusted addresses in the storm, one held session each (default 200)")
    parser.add_argument("--storm-consoles", type=int, default=10, help="consoles the storm spreads over (default 10)")
    parser.add_argument("--storm-lone", type=int, default=5,
                        help="lone untrusted sessions, one after another (default 5)")
    parser.add_argument("--storm-sustained", type=int, default=5000,
                        help="untrusted addresses over --storm-sustained-seconds (default 5000; 0: none)")
    parser.add_argument("--storm-sustained-seconds", type=float, default=60, help="(default 60)")
    parser.add_argument("--storm-ipv6", type=int, default=1000,
                        help="addresses of one IPv6 /64 failing logins against the bruteforce rulebook "
                             "(default 1000; 0: none)")
    parser.add_argument("--fleet-hosts", type=int, default=100,
                        help="remote TLS hypervisor hosts (tests/lab/fleet.py) in the fleet scale run "
                             "(default 100; 0: skip it)")
    parser.add_argument("--fleet-workers", type=int, default=4, help="hosts started at once (default 4)")
    parser.add_argument("--fleet-partition", type=float, nargs="+", default=[40, 60],
                        help="seconds every fleet host stays partitioned, one partition (healed at once) "
                             "per value (default 40 60)")
    parser.add_argument("--fleet-block-hosts", type=int, nargs="*", default=[3, 10],
                        help="fleet sizes of the fleet-wide block run (default 3 10; none: skip it)")
    parser.add_argument("--fleet-block-forks", type=int,
                        help="Ansible forks for the fleet-wide block's runs (default: Ansible's, 5)")
    parser.add_argument("--reconnect-rounds", type=int, default=40,
                        help="daemon restarts in the reconnection measurement (default 40)")
    parser.add_argument("--blind-starts", type=int, default=100,
                        help="source starts during each storm of the blind-starts measurement (default 100)")
    parser.add_argument("--blind-storms", type=int, nargs="+", default=[2, 8],
                        help="clients per console of each storm of the blind-starts measurement (default 2 8)")
    parser.add_argument("--memory-seconds", type=float, default=300,
                        help="seconds of storm per listener in the libvirtd-memory measurement (default 300)")
    parser.add_argument("--memory-clients", type=int, default=16,
                        help="storm clients per console in the libvirtd-memory measurement (default 16)")
    parser.add_argument("--memory-modes", nargs="+", choices=MEMORY_MODES + MORE_MEMORY_MODES,
                        default=list(MEMORY_MODES),
                        help="listeners of the libvirtd-memory measurement (firewalled: the source, and the console "
                             "firewall's total rate limit on the consoles; virsh_lifecycle: virsh listening to "
                             "lifecycle events only)")
    parser.add_argument("--memory-rate-total", type=int, default=200,
                        help="the console firewall's rate_total in the libvirtd-memory measurement's firewalled mode "
                             "(default 200 new connections a second)")
    parser.add_argument("--memory-source-args", default="{}",
                        help="the source's arguments in the libvirtd-memory measurement, JSON (default: as shipped)")
    parser.add_argument("--second-run-rounds", type=int, default=2,
                        help="alternating rounds of the second-run measurement (default 2)")
    parser.add_argument("--second-run-waits", type=float, nargs="+", default=[0.0, 0.25],
                        help="virtguard_second_run_wait values compared side by side (default 0 0.25)")
    parser.add_argument("--second-run-busy-delays", type=float, nargs="+", default=[0.5],
                        help="virtguard_busy_heartbeat_delay values compared side by side, with each wait "
                             "(default 0.5)")
    parser.add_argument("--resilience-lone", type=int, default=5,
                        help="lone untrusted sessions, the reference of the resilience measurement (default 5)")
    parser.add_argument("--resilience-followers", type=int, default=5,
                        help="offenders one at a time after the link-local one (default 5)")
    parser.add_argument("--resilience-domain-rounds", type=int, default=3,
                        help="rounds of a domain destroyed under its offender, each with the offender's run in "
                             "flight and with the offender queued (default 3)")
    parser.add_argument("--resilience-set-size", type=int, default=10,
                        help="virtguard_block_set_size for the full set (default 10)")
    parser.add_argument("--resilience-groups", type=int, nargs="+", default=[13, 13, 4],
                        help="reconnecting offenders per /24 for the full set (default 13 13 4: 30)")
    parser.add_argument("--resilience-window", type=float, default=60,
                        help="seconds from the first offender's connect over which the full set's connected time "
                             "is measured (default 60)")
    parser.add_argument("--resilience-threshold", type=int, default=4,
                        help="virtguard_bruteforce_threshold for the protected addresses (default 4)")
    parser.add_argument("--resilience-lock-storm", type=int, default=100,
                        help="addresses of each storm around the audit lock (default 100)")
    parser.add_argument("--resilience-consoles", type=int, default=5,
                        help="consoles of the resilience daemon (default 5; at least 2, and 32 sessions each at most)")
    parser.add_argument("--profile", metavar="DIR",
                        help="profile the source (cProfile) in the bursts, the real activation and the soak, into DIR; "
                             "profiled figures are slower and only for finding where time goes")
    parser.add_argument("--json", metavar="FILE", default=str(ROOT / "build" / "bench" / "results.json"),
                        help="also write every number here (default build/bench/results.json)")
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
            return done.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    model = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import libvirt

    lv = libvirt.getVersion()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_available_mib": mem_available_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libvirt": f"{lv // 1000000}.{lv // 1000 % 1000}.{lv % 1000}",
        "qemu": version(["qemu-system-x86_64", "--version"]),
        "ansible_rulebook": version([str(Path(sys.executable).parent / "ansible-rulebook"), "--version"]),
        "load_average_start": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


class Report:
    """Prints as it goes: every figure with its goal and whether it is met."""

    def __init__(self) -> None:
        self.figures: list[dict[str, Any]] = []
        self.lost = 0

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def line(self, text: str) -> None:
        print(text, flush=True)

    def figure(self, name: str, value: str, goal: str | None = None, met: bool | None = None) -> None:
        verdict = "" if met is None else ("  [met]" if met else "  [NOT MET]")
        print(f"  {name}: {value}" + (f"   (goal: {goal})" if goal else "") + verdict, flush=True)
        self.figures.append({"name": name, "value": value, "goal": goal, "met": met})


def report_burst(report: Report, result: dict[str, Any], options: argparse.Namespace) -> None:
    r = result
    report.line(f"  {len(r['rows'])} bursts of {options.sessions} sessions over {r['domains']} domains on "
                f"{r['uris']} hypervisors; both listeners at once, the source into asyncio.Queue(maxsize=1)")
    report.figure("bare listener, events/s (median)", f"{r['bare_eps_median']:.0f}")
    report.figure("source, events/s (median)", f"{r['source_eps_median']:.0f}")
    report.figure("source/bare ratio, median of bursts",
                  f"{r['ratio_median']:.3f} (spread {r['ratio_min']:.3f}..{r['ratio_max']:.3f})",
                  ">= 0.95", r["ratio_median"] >= 0.95)
    report.figure("events lost by the source, all bursts", str(r["source_lost"]), "0 in every burst",
                  r["source_lost"] == 0)
    report.figure("events lost by the bare listener (control)", str(r["bare_lost"]))
    report.figure("duplicate events from the source", str(r["duplicates"]), "0", r["duplicates"] == 0)
    if r["failed_sessions"]:
        report.figure("client sessions that failed (not counted as expected)", str(r["failed_sessions"]))
    report.figure("CPU per event, bare / source (median)",
                  f"{r['bare_cpu_us_median']:.0f} us / {r['source_cpu_us_median']:.0f} us")
    split = r["source_cpu_us_by_thread_median"]
    report.figure("source CPU per event by thread (median): asyncio loop / libvirt's event thread / other",
                  f"{split['loop']:.0f} us / {split['libvirt_events']:.0f} us / {split['other']:.0f} us")
    report.figure("source RSS after warm-up / after the bursts",
                  f"{r['rss_kib_start'] / 1024:.1f} MiB / {r['rss_kib_end'] / 1024:.1f} MiB")
    report.lost += r["source_lost"] + r["duplicates"]


def report_latency(report: Report, result: dict[str, Any]) -> None:
    r = result
    report.line("  from libvirt's callback (time in the raw event) to the consumer taking it off the queue")
    paced = r.get("paced")
    if paced:
        report.line(f"  steady flow: {paced['sessions']} sessions at {paced['rate_sessions_per_s']:g} sessions/s "
                    f"({3 * paced['rate_sessions_per_s']:g} events/s), a pace both listeners keep up with")
        report.figure("steady flow, p50", f"{paced['latency_p50_ms']:.2f} ms")
        report.figure("steady flow, p99", f"{paced['latency_p99_ms']:.2f} ms", "p99 < 5 ms",
                      paced["latency_p99_ms"] < 5.0)
        report.figure("steady flow, max", f"{paced['latency_max_ms']:.2f} ms")
        report.figure("steady flow, events lost", str(paced["source_lost"]), "0", paced["source_lost"] == 0)
    report.line("  during the bursts above, which arrive faster than the source drains them: the time an "
                "event waits behind the burst's backlog is included")
    report.figure("bursts, p50 (median of bursts)", f"{r['latency_p50_ms']:.2f} ms")
    report.figure("bursts, p99 (worst burst; median of bursts)",
                  f"{r['latency_p99_ms_worst']:.2f} ms; {r['latency_p99_ms_median']:.2f} ms",
                  None if paced else "p99 < 5 ms", None if paced else r["latency_p99_ms_worst"] < 5.0)
    report.figure("bursts, max", f"{r['latency_max_ms']:.2f} ms")


def report_endtoend(report: Report, r: dict[str, Any]) -> None:
    report.line(f"  {len(r['rows'])} rounds, each the engine's ceiling (bench_replay feeding console_audit.yml's "
                f"filter and rules) and the same rulebook with the source, in alternating order; the source "
                f"takes a real burst of {r['sessions']} sessions live, then one it finds waiting "
                f"(SIGSTOP during the burst)")
    report.figure("engine ceiling, events/s (median)", f"{r['ceiling_eps_median']:.0f}")
    report.figure("with the source, burst taken live, events/s (median; bounded by the arrivals)",
                  f"{r['live_eps_median']:.0f}")
    report.figure("with the source, burst waiting when the activation resumes, events/s (median)",
                  f"{r['real_eps_median']:.0f}")
    for name, key in (("ceiling", "ceiling_cpu_us_median"), ("with the source, backlog", "real_cpu_us_median")):
        cpu = r[key]
        report.figure(f"activation CPU per event, {name} (median): main thread / other Python threads / JVM",
                      f"{cpu['main']:.0f} us / {cpu['python_threads']:.0f} us / {cpu['jvm']:.0f} us")
    report.figure("ratio to the ceiling, median of rounds",
                  f"{r['ratio_median']:.3f} (spread {r['ratio_min']:.3f}..{r['ratio_max']:.3f})",
                  ">= 0.9", r["ratio_median"] >= 0.9)
    report.figure("events lost through ansible-rulebook", str(r["lost"]), "0", r["lost"] == 0)
    report.figure("duplicate events", str(r["duplicates"]), "0", r["duplicates"] == 0)
    report.lost += r["lost"] + r["duplicates"]


def report_scale(report: Report, r: dict[str, Any]) -> None:
    report.line(f"  {r['hypervisors']} session daemons x {r['domains']} running domains "
                f"({r['hypervisors'] * r['domains']} domains, up in {r['setup_s']:.0f}s), one console client open "
                f"on each hypervisor; {len(r['runs'])} fresh source processes")
    if r.get("scaled_down"):
        report.line(f"  SCALED DOWN: {r['scaled_down']}")
    report.figure("start to all connections registered (median; worst)",
                  f"{r['registered_median']:.2f} s; {r['registered_worst']:.2f} s")
    report.figure("start to every snapshot delivered (median; worst)",
                  f"{r['snapshot_median']:.2f} s; {r['snapshot_worst']:.2f} s", "< 2 s", r["snapshot_worst"] < 2.0)
    report.figure("snapshots delivered", f"{r['snapshots_min']} of {r['hypervisors']} (fewest in a run)",
                  f"{r['hypervisors']}", r["snapshots_min"] == r["hypervisors"])
    report.lost += r["hypervisors"] - r["snapshots_min"]


def report_soak(report: Report, r: dict[str, Any]) -> None:
    b = r["bound"]
    report.line(f"  {r['events']:,} events through the source's callback (synthetic libvirt arguments, in the "
                f"source's process: HypervisorWatcher.on_graphics -> buffer -> feed() -> Queue(maxsize=1) -> "
                f"consumer), {r['stall_cycles']} consumer stalls of {r['stall_events']:,} events each")
    report.figure("RSS first / warm (after the first stall) / min..max once warm, buffer empty",
                  f"{r['rss_first_kib'] / 1024:.1f} / {r['rss_warm_kib'] / 1024:.1f} / "
                  f"{r['rss_min_warm_kib'] / 1024:.1f}..{r['rss_max_warm_kib'] / 1024:.1f} MiB")
    report.figure("RSS deviation once warm", f"{100 * r['rss_deviation']:.1f}%", "within +-5%",
                  r["rss_deviation"] <= 0.05)
    if r.get("rss_stalled_max_kib"):
        report.figure("RSS with a stalled consumer (buffer full of the stall)",
                      f"{r['rss_stalled_max_kib'] / 1024:.1f} MiB")
    traced = r.get("traced_kib_after_drain") or []
    if traced:
        growth = traced[-1] - traced[0]
        report.figure("live Python memory after each further stall and drain (tracemalloc)",
                      " / ".join(f"{kib:.0f}" for kib in traced) + f" KiB, growth {growth:+.0f} KiB",
                      "no growth (< 64 KiB)", growth < 64)
    report.figure("events lost in the soak", str(r["lost"]), "0", r["lost"] == 0)
    report.figure("source-only rate with a free consumer (synthetic callbacks)",
                  f"{r['flow_events_per_s']:.0f} events/s, {r['cpu_us_per_event']:.0f} us CPU per event")
    report.figure("buffer bound, a stall past max_buffered_events",
                  f"{b['injected']:,} events in, at most {b['max_buffered']:,} held (limit {b['limit']:,}), "
                  f"{b['refused_and_counted']:,} refused and counted, hypervisor paused for resync: {b['paused']}, "
                  f"RSS {b['rss_kib'] / 1024:.1f} MiB", "bound holds, nothing unaccounted", b["holds"])
    report.lost += r["lost"] + b["lost"]


def report_audit(report: Report, r: dict[str, Any]) -> None:
    report.figure("audit writer alone (AuditLog.append, fsync=interval)", f"{r['writer_per_s']:.0f} records/s")
    report.figure("classify filter (policy verdict + audit record) per event", f"{r['classify_per_s']:.0f} events/s")
    report.figure("records lost", str(r["lost"]), "0", r["lost"] == 0)
    report.lost += r["lost"]


def report_storm(report: Report, r: dict[str, Any]) -> None:
    lone, storm = r["lone"], r["storm"]
    report.line("  the shipped unauthorized_console rulebook through ansible-rulebook, one session daemon with "
                f"{r['consoles']} consoles, clients with addresses of their own; times are libvirt's, from a "
                "session's connect event to its disconnect event (the cut)")
    report.figure("lone untrusted session, connect to cut (p50)",
                  f"{lone['p50_s']:.2f} s over {lone['cut']} of {lone['runs']} sessions" if lone["p50_s"]
                  else "none cut",
                  "p50 <= 2 s", lone["p50_s"] is not None and lone["p50_s"] <= 2.0 and lone["cut"] == lone["runs"])
    report.figure(f"storm of {r['addresses']} addresses: sessions opened / cut by a remediation / not cut",
                  f"{storm['opened']} (in {storm['open_s']:.1f} s) / {storm['cut']} / {storm['not_cut']}",
                  "every session cut", storm["not_cut"] == 0 and storm["cut"] == storm["opened"])
    report.figure("storm, connect to cut: p50 / last (beside the lone session's p50)",
                  f"{storm['p50_s']:.2f} s / {storm['max_s']:.2f} s (lone {lone['p50_s'] or 0:.2f} s)"
                  if storm["max_s"] is not None else "none cut",
                  "p50 <= 5 s, last <= 10 s",
                  storm["max_s"] is not None and storm["p50_s"] <= 5.0 and storm["max_s"] <= 10.0)
    report.figure("storm, playbook runs (batch sizes)", f"{storm['runs']} ({storm['batch_sizes']})", "<= 10",
                  storm["runs"] <= 10)
    report.lost += storm["not_cut"]
    sustained = r.get("sustained")
    if sustained:
        report.figure(f"sustained, {sustained['addresses']} addresses over {sustained['open_s']:.0f} s: "
                      "opened / cut / not cut / runs",
                      f"{sustained['opened']} / {sustained['cut']} / {sustained['not_cut']} / {sustained['runs']}",
                      "every session cut", sustained["not_cut"] == 0)
        report.figure("sustained, activation alive at the end", str(sustained["alive"]), "True", sustained["alive"])
        report.figure("sustained, activation RSS start / max / end",
                      f"{sustained['rss_kib_start'] / 1024:.0f} / {sustained['rss_kib_max'] / 1024:.0f} / "
                      f"{sustained['rss_kib_end'] / 1024:.0f} MiB")
        within = all(s["size"] and s["elements"] <= s["size"] for s in sustained["sets"].values())
        report.figure("sustained, block sets (elements / size)",
                      ", ".join(f"{k} {v['elements']}/{v['size']}" for k, v in sustained["sets"].items()),
                      "within their size", within)
        report.lost += sustained["not_cut"]
    ipv6 = r.get("ipv6")
    if ipv6:
        refused_from = ipv6["refused_from_s"]
        report.figure(f"IPv6 brute force, {ipv6['addresses']} addresses of {ipv6['prefix']}: "
                      "logins through / refused / runs",
                      f"{ipv6['attempts']} / {ipv6['refused']} / {ipv6['runs']}; refused from "
                      f"{refused_from if refused_from is None else round(refused_from, 1)} s after the first attempt")
        report.figure("IPv6 brute force, the /64 blocked", f"{ipv6['blocked']} ({', '.join(ipv6['networks'])})",
                      "True", ipv6["blocked"])


def report_fleet(report: Report, r: dict[str, Any]) -> None:
    args = r["source_args"]
    report.line(f"  {r['hosts']} fleet hosts (system libvirtd each, own netns), qemu+tls, one running domain and one "
                f"held console session each; up in {r['hosts_start_s']:.0f} s; "
                f"load at start {r['load_average_start']}; "
                f"keepalive {args['keepalive_interval']} s x {args['keepalive_count']}, reconnect_max_delay "
                f"{args['reconnect_max_delay']} s")
    report.figure("start to every snapshot delivered",
                  "not all" if r["snapshot_s"] is None
                  else f"{r['snapshot_s']:.2f} s (p50 {r['snapshot_p50_s']:.2f} s)",
                  "<= 5 s", r["snapshot_s"] is not None and r["snapshot_s"] <= 5.0)
    report.figure("source memory per hypervisor (RSS after the snapshots less before main, / hosts)",
                  f"{r['rss_delta_kib'] / r['hosts']:.0f} KiB ({r['base_rss_kib'] / 1024:.0f} -> "
                  f"{r['rss_after_snapshots_kib'] / 1024:.0f} MiB; {r['rss_end_kib'] / 1024:.0f} MiB at the end)")
    for partition in r["partitions"]:
        noticed, resync = partition["partition_noticed_s"], partition["resync_s"]
        report.figure(f"partition of all {r['hosts']} for {partition['seconds']:.0f} s: noticed by keepalive",
                      f"{noticed['first']:.1f}..{noticed['last']:.1f} s after it began")
        report.figure(f"partition of {partition['seconds']:.0f} s: heal of all at once to every host "
                      "resynchronised (watched again, snapshot on the queue)",
                      f"{partition['resynchronised']} of {r['hosts']}; p50 {resync['median']:.1f} s, "
                      f"last {resync['last']:.1f} s" if resync["last"] is not None else "none",
                      "<= 30 s", partition["resynchronised"] == r["hosts"] and resync["last"] is not None
                      and resync["last"] <= 30)
    report.figure("live events raised on the hosts / delivered / lost / duplicated",
                  f"{r['live_events_raised']} / {r['live_events_delivered']} / {r['live_events_lost']} / "
                  f"{r['duplicates']}", "0 lost", r["live_events_lost"] == 0 and r["duplicates"] == 0)
    report.lost += r["live_events_lost"] + r["duplicates"] + r["hosts"] - r["snapshots_delivered"]


def report_reconnect(report: Report, r: dict[str, Any]) -> None:
    report.line(f"  one source, one session daemon stopped and started {r['rounds'] - 1} times; a real VNC session "
                "on each connection; memory sampled at the end of each round, slopes after the first 5 rounds")
    report.figure("Python memory blocks kept per reconnection (live, after a collection)",
                  f"{r['blocks_per_reconnection']:.1f}", "no growth (< 50)", r["blocks_per_reconnection"] < 50)
    report.figure("RSS per reconnection", f"{r['rss_kib_per_reconnection']:.1f} KiB "
                  f"({r['rss_first_kib'] / 1024:.1f} MiB after the first round, {r['rss_last_kib'] / 1024:.1f} MiB "
                  "after the last)")
    report.figure("events lost across the reconnections", str(r["lost"]), "0", r["lost"] == 0)
    report.lost += r["lost"]


def report_libvirtd_memory(report: Report, r: dict[str, Any]) -> None:
    report.line(f"  a fresh session daemon per listener, {r['consoles']} consoles, {r['clients_per_console']} clients "
                f"per console running whole VNC sessions back to back for {r['seconds']:g} s; libvirtd's RSS read "
                "from its /proc every second; the load average (1 min) is given with each figure")

    def growth(row: dict[str, Any]) -> float:
        return float(row["rss_max_kib"] - row["rss_before_kib"]) / 1024

    for mode in MEMORY_MODES + MORE_MEMORY_MODES:
        if mode not in r:
            continue
        row = r[mode]
        extra = (f"; shed {row['shed']} times, resynchronised {row['resynchronised']}, {row['events']} events "
                 "taken" if mode in ("source", "firewalled") else "")
        if mode == "firewalled":
            extra += (f"; the firewall let {row['allowed_attempts']} new connections through and refused "
                      f"{row['rate_limited_attempts']} over {row['rate_total']} a second")
        report.figure(f"libvirtd growth under the storm, {mode}",
                      f"+{growth(row):.0f} MiB ({row['rss_before_kib'] / 1024:.0f} to at most "
                      f"{row['rss_max_kib'] / 1024:.0f} MiB, {row['rss_after_kib'] / 1024:.0f} MiB 5 s after; "
                      f"{row['sessions_per_s']:.0f} sessions/s; listener alive {row['listener_alive']}"
                      + (f", exited after {row['listener_exited_after_s']:.0f} s"
                         if row.get("listener_exited_after_s") is not None else "")
                      + f"{extra}; MiB at 10/30/60/120/300 s: "
                      + "/".join(f"{kib / 1024:.0f}" for kib in row.get("rss_at_kib", {}).values()) + "); "
                      f"load {row['load']}")
    if "source" in r and "virsh" in r:
        source, virsh = growth(r["source"]), growth(r["virsh"])
        report.figure("libvirtd growth with the source against with virsh event",
                      f"+{source:.0f} MiB / +{virsh:.0f} MiB", "no worse than virsh", source <= max(virsh, 0) + 16)
    if "firewalled" in r:
        report.figure(f"libvirtd growth with the source behind a total rate limit of {r['rate_total']} a second",
                      f"+{growth(r['firewalled']):.0f} MiB", "bounded: at most 16 MiB",
                      growth(r["firewalled"]) <= 16)


def report_blind_starts(report: Report, r: dict[str, Any]) -> None:
    report.line("  the source as shipped (delivery check every 20 s of quiet, 10 s timeout) started in this process "
                "while 2 consoles of one session daemon take a storm of whole VNC sessions; after a random 0.2 to "
                "1 s the storm stops and one session opens; the load average (1 min) is given with each figure")
    for storm in r["storms"]:
        report.figure(f"starts during a storm of {storm['sessions_per_s']:.0f} sessions/s "
                      f"({storm['clients_per_console']} clients per console): blind for good (the session after the "
                      "storm never seen within 60 s)",
                      f"{storm['blind_for_good']} of {storm['starts']}; seen live {storm['seen_live']} (p50 "
                      f"{_opt(median(storm['seen_after_s']))} s), healed by the delivery check {storm['healed']} "
                      f"({_seconds(storm['healed_after_s'])}); load {storm['load']}, after {storm['load_after']}",
                      "0", storm["blind_for_good"] == 0)


def report_second_run(report: Report, r: dict[str, Any]) -> None:
    report.line("  alternating rounds on one session daemon: the full set (block set of 10, 30 offenders reconnecting "
                "every 0.4 s, 60 s window) and a storm of 200, for each virtguard_second_run_wait (0: one run in "
                "flight per host) and virtguard_busy_heartbeat_delay; the load average (1 min) is given with each "
                "round")
    for row in r["rounds"]:
        report.figure(f"round {row['round']}, second_run_wait {row['second_run_wait']:g}, busy_heartbeat_delay "
                      f"{row.get('busy_heartbeat_delay', 0.5):g} (load {row['load']}): "
                      "full set overflow connected, ss / sessions; its runs; storm of 200 p50 / last, runs; lone p50",
                      f"{100 * (row['full_set_overflow_ss'] or 0):.1f} / "
                      f"{100 * (row['full_set_overflow_sessions'] or 0):.1f} %; {row['full_set_runs']}; "
                      f"{_opt(row['storm_p50_s'])} / {_opt(row['storm_last_s'])} s, {row['storm_runs']}; "
                      f"{_opt(row['lone_p50_s'])} s",
                      "overflow < 5 %; storm p50 <= 5 s, last <= 10 s (idle machine)",
                      (row["full_set_overflow_ss"] or 1) < 0.05 and (row["storm_p50_s"] or 99) <= 5
                      and (row["storm_last_s"] or 99) <= 10 and not row["storm_not_cut"]
                      and not row["trusted_blocked"])


def report_resilience(report: Report, r: dict[str, Any]) -> None:
    lone = r["lone"]
    reference = lone["p50_s"]
    bound = None if reference is None else reference + 1.0
    beside = "no lone session cut" if reference is None else f"lone p50 {reference:.2f} s"
    within = f"each <= lone p50 + 1 s = {bound:.2f} s" if bound is not None else "each <= lone p50 + 1 s"
    report.line("  the shipped rulebooks through ansible-rulebook, one session daemon with VNC on ::, "
                f"{r['consoles']} consoles; times are libvirt's (connect to disconnect), cuts judged with ss and "
                "query-vnc; the load average (1 min) is given with each figure")
    report.figure("lone untrusted session, connect to cut (p50 of the sessions before and after the link-local "
                  "and domain phases): the reference",
                  f"{reference:.2f} s over {lone['cut']} of {lone['runs']} ({_seconds(lone['latencies_s'])}; p50 "
                  f"before {_opt(lone['p50_before_s'])} s, after {_opt(lone['p50_after_s'])} s); load {lone['load']}, "
                  f"after {lone['load_after']}" if reference is not None else f"none cut; load {lone['load']}",
                  "p50 <= 2 s on an idle machine", reference is not None and reference <= 2.0
                  and lone["cut"] == lone["runs"])
    ll = r["link_local"]
    report.figure("link-local offender: shown by ss with its zone; cut (connect to cut); cut records ok; blocked "
                  "by its /128",
                  f"{ll['zoned']}; {ll['link_local_cut']} "
                  f"({_opt(ll['link_local_s'])} s); {ll['cut_records_ok']}; {ll['link_local_blocked_128']}",
                  "True; True; True; True", ll["zoned"] and ll["link_local_cut"] and ll["cut_records_ok"]
                  and ll["link_local_blocked_128"])
    report.figure("after a link-local offender: later offenders cut, worst (p50) connect to cut",
                  f"{ll['followers_cut']} of {ll['followers']}, worst {_opt(ll['worst_s'])} s "
                  f"(p50 {_opt(median([s for s in ll['latencies_s'] if s is not None]))} s) "
                  f"({_seconds(ll['latencies_s'])}; "
                  f"{beside}); each sent alone at its own connect: {ll['followers_sent_alone']} of {ll['followers']}; "
                  f"later batches holding the link-local one: {ll['link_local_batches_after_its_own']}; "
                  f"load {ll['load']}", f"every one cut, {within}",
                  ll["followers_cut"] == ll["followers"] and bound is not None and ll["worst_s"] is not None
                  and ll["worst_s"] <= bound)
    de = r["domain_end"]
    for kind, when in (("in flight", "once the dead session's run ended"),
                       ("in flight, at once", "at once, beside the dead session's run"),
                       ("queued", "once the run it was queued behind ended")):
        row = de[kind]
        phase = kind.split(",", maxsplit=1)[0]
        report.figure(f"domain destroyed under an offender ({phase}): the next offender on another "
                      f"console, {when}: cut, worst connect to cut",
                      f"{row['cut']} of {row['asked']}, worst {_opt(row['worst_s'])} s "
                      f"({_seconds([x['latency_s'] for x in de['rounds'] if x['kind'] == kind])}; {beside}); "
                      f"disconnect ended_by domain {row['ended_by_domain']} of {row['asked']}; the next offender sent "
                      f"alone at its own connect {row['sent_alone']} of {row['asked']}; load {de['load']}",
                      f"every one cut, {within}",
                      row["cut"] == row["asked"] and bound is not None and row["worst_s"] is not None
                      and row["worst_s"] <= bound)
    fs = r["full_set"]
    window = f"the {fs.get('window_s', 0):.0f} s from the first offender's connect"
    report.figure(f"full set ({fs['set_size']}), {fs['offenders']} offenders reconnecting every {fs['pause_s']} s: "
                  f"the {fs['overflow']} beyond the set of single addresses connected, share of {window} "
                  "(ss samples / libvirt's sessions)",
                  f"{_share(fs.get('overflow_share_ss'))} / {_share(fs.get('overflow_share_events'))}; "
                  f"load {fs['load']}", "< 5 %",
                  fs.get("overflow_share_ss") is not None and max(fs["overflow_share_ss"],
                                                                  fs["overflow_share_events"]) < 0.05)
    report.figure("full set: where the overflow's connected time goes (libvirt's sessions): before each "
                  "offender's first cut / after it",
                  f"{_share(fs.get('overflow_share_before_first_cut'))} / "
                  f"{_share(fs.get('overflow_share_after_first_cut'))} of the window; first connect to first cut "
                  f"p50 {_opt(fs.get('overflow_to_first_cut_p50_s'))} s, "
                  f"max {_opt(fs.get('overflow_to_first_cut_max_s'))} s ({beside}); "
                  f"never cut {fs.get('overflow_never_cut')}; "
                  f"{fs.get('sessions_after_first_cut')} sessions after a first cut")
    report.figure("full set: all offenders together (ss / sessions); sessions in the window; runs "
                  "(batch size, its cut landed at, widened to)",
                  f"{_share(fs.get('all_share_ss'))} / {_share(fs.get('all_share_events'))}; "
                  f"{fs.get('sessions_in_window')}; "
                  + ", ".join(f"{run['batch_size']} at {_opt(run['cut_at_s'])} s"
                              + (f" -> {' '.join(run['widened'])}" if run["widened"] else "") for run in fs["runs"]))
    report.figure("full set: every offender blocked, none connected after; the trusted neighbour blocked / "
                  "gets a session",
                  f"{fs['all_blocked']}, {fs['connected_after_blocked']}; {fs['trusted_blocked']} / "
                  f"{fs['trusted_session']}", "True, 0; False / True",
                  fs["all_blocked"] and fs["connected_after_blocked"] == 0 and not fs["trusted_blocked"]
                  and fs["trusted_session"])
    pr = r["protected"]
    cases = pr["cases"]
    report.figure("bruteforce: trusted addresses blocked: proxy / same-/64 admin / exclusive-client case "
                  "(and the admin failing logins itself)",
                  f"{int(cases['proxy']['blocked'])} / {int(cases['same /64']['blocked'])} / "
                  f"{int(cases['exclusive client']['blocked'])} ({int(cases['trusted admin']['blocked'])}); "
                  f"load {pr['load']}", "0", pr["trusted_blocked"] == 0 and not pr["protected_in_remediations"])
    report.figure("bruteforce: trusted sessions cut (proxy, admin, same-/64 admin); brute-force reports "
                  "(proxy, admin)",
                  f"{pr['trusted_cut']}; {cases['proxy']['reports']}, {cases['trusted admin']['reports']}",
                  "0; reported", pr["trusted_cut"] == 0 and cases["proxy"]["reports"] > 0
                  and cases["trusted admin"]["reports"] > 0)
    ex = cases["exclusive client"]
    report.figure("exclusive client, no authentication: shared sessions dropped / their disconnects / counted as "
                  "failed logins / the untrusted bystander blocked",
                  f"{sum(ex['dropped'].values())} / {ex['disconnects']} / {ex['failed_logins']} / "
                  f"{ex['bystander_blocked']}", "0 failed logins, not blocked",
                  ex["failed_logins"] == 0 and not ex["bystander_blocked"]
                  and sum(ex["dropped"].values()) == 2 * pr["attempts"])
    same = cases["same /64"]
    report.figure("controls: an untrusted address failing the threshold blocked and its session cut; the attacker "
                  "in the admin's /64 blocked by its /128 (not the /64), its session cut",
                  f"{pr['control']['blocked']} and {pr['control']['session_cut']}; {same['attacker_blocked_128']} "
                  f"(/64: {same['prefix_blocked']}), {pr['attacker6_session_cut']}",
                  "True and True; True (/64: False), True",
                  pr["control"]["blocked"] and pr["control"]["session_cut"] and same["attacker_blocked_128"]
                  and not same["prefix_blocked"] and pr["attacker6_session_cut"])
    al = r["audit_lock"]
    free, locked = al["free"], al["locked"]
    report.figure(f"storm of {al['storm']} while a reader holds the audit file's flock: opened / cut / not cut "
                  "(ss and query-vnc); lock held throughout",
                  f"{locked['opened']} / {locked['opened'] - locked['not_cut']} / {locked['not_cut']}; "
                  f"{al['lock_held_before'] and al['lock_held_after']}; load {al['load']}",
                  "every offender cut", locked["not_cut"] == 0 and locked["opened"] > 0 and locked["gone_s"] is not None
                  and al["lock_held_before"] and al["lock_held_after"])
    report.figure("the same storm: first session opened to none left in the hypervisor's connections (ss), "
                  "locked / free (free: p50 / last connect to cut); playbook runs all ended after",
                  f"{_opt(locked['ss_gone_s'])} s / {_opt(free['ss_gone_s'])} s ({_opt(free['p50_s'])} / "
                  f"{_opt(free['max_s'])} s; {beside}); {_opt(al['locked_runs_end_s'])} s")
    counts = al["counts"]
    report.figure("audit loss under the lock: stated / missing by seq / graphics events missing, filter records; "
                  "remediation records: stated / missing",
                  f"{counts['stated_lost_events']} / {counts['seq_gaps']} / {al['missing_events']} (of "
                  f"{counts['graphics_events']} events); "
                  f"{counts['stated_lost_remediations']} / {al['missing_remediations']} (of "
                  f"{2 * counts['audit_runs']}); end marked: {al['end_marked']}",
                  "stated = missing, > 0", al["exact"] and al["end_marked"] and counts["stated_lost_events"] > 0)
    report.lost += locked["not_cut"] + ll["followers"] - ll["followers_cut"]


def _seconds(values: list[float | None]) -> str:
    return ", ".join("not cut" if v is None else f"{v:.2f}" for v in values)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report_fleet_block(report: Report, r: dict[str, Any]) -> None:
    report.line("  the shipped unauthorized_console rulebook through ansible-rulebook, virtguard_block_scope: fleet, "
                "remediation over SSH to every host of virtguard_fleet_group; one untrusted session on the last "
                f"host; Ansible forks: {r['forks'] or 'default (5)'}; load at start {r['load_average_start']}")
    for run in r["runs"]:
        report.figure(f"{run['hosts']} hosts: connection to the last host's block (first, median)",
                      f"{run['last_block_s']:.2f} s ({run['first_block_s']:.2f}, {run['median_block_s']:.2f}); "
                      f"blocked on {run['blocked_on']} of {run['hosts']}, {run['audit_hosts']} hosts audited"
                      if run["last_block_s"] is not None else "no block",
                      "every host blocks", run["blocked_on"] == run["hosts"] == run["audit_hosts"])
        report.figure(f"{run['hosts']} hosts: the session's connect to its cut (libvirt's times)",
                      "not cut" if run["cut_s"] is None else f"{run['cut_s']:.2f} s")


def run_scale(lab: Lab, report: Report, options: argparse.Namespace) -> dict[str, Any]:
    from lab import rfb

    hypervisors, domains = options.scale_hypervisors, options.scale_domains
    fit = (mem_available_mib() - MEMORY_RESERVE_MIB) // (MIB_PER_DOMAIN * hypervisors)
    scaled_down = None
    if fit < domains:
        scaled_down = (f"{domains} domains per hypervisor would need about "
                       f"{MIB_PER_DOMAIN * hypervisors * domains} MiB; {mem_available_mib()} MiB available, "
                       f"so {max(1, fit)} per hypervisor")
        domains = max(1, fit)
        report.line(f"# scale: {scaled_down}")
    started = time.monotonic()
    hvs = lab.hypervisors_with_domains("sc", hypervisors, domains)
    setup = time.monotonic() - started
    report.line(f"# scale: {hypervisors} daemons x {domains} domains up in {setup:.0f}s")
    clients = [rfb.open_session("127.0.0.1", hv.domains[-1].vnc_port) for hv in hvs]
    runs = []
    try:
        for _run in range(options.scale_runs):
            proc = lab.spawn([sys.executable, "-m", "bench.scale", *[hv.uri for hv in hvs]],
                             stdout=subprocess.PIPE, text=True)
            out, _err = proc.communicate(timeout=600)
            lab.stop_process(proc)
            runs.append(json.loads(out.strip().splitlines()[-1]))
            report.line(f"#   registered {runs[-1]['registered_s']:.2f}s, snapshots {runs[-1]['snapshot_s']:.2f}s")
    finally:
        for sock in clients:
            sock.close()
        lab.release(hvs)
    return {
        "hypervisors": hypervisors, "domains": domains, "setup_s": setup, "scaled_down": scaled_down, "runs": runs,
        "registered_median": median([r["registered_s"] for r in runs]),
        "registered_worst": max(r["registered_s"] for r in runs),
        "snapshot_median": median([r["snapshot_s"] for r in runs]),
        "snapshot_worst": max(r["snapshot_s"] for r in runs),
        "snapshots_min": min(r["snapshots_delivered"] for r in runs),
    }


def run_soak(lab: Lab, options: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.soak", "--events", str(options.soak_events),
           "--stall-events", str(options.soak_stall_events), "--flow-events", str(options.soak_flow_events),
           "--limit", str(options.soak_limit), "--sample-every", str(max(3, options.soak_flow_events // 5))]
    if options.profile:
        cmd += ["--profile", str(Path(options.profile) / "source_soak.prof")]
    proc = lab.spawn(cmd, stdout=subprocess.PIPE, text=True)
    out, _err = proc.communicate(timeout=3600)
    lab.stop_process(proc)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    from lab.own_network import enter_own_network

    enter_own_network()  # as the test suite: the machine's firewall cannot see the lab (docs/testing.md)
    chosen = options.only or list(MEASUREMENTS)
    if options.profile:
        Path(options.profile).mkdir(parents=True, exist_ok=True)
    report = Report()
    results: dict[str, Any] = {"machine": machine(), "options": vars(options)}
    m = results["machine"]
    report.line(f"# virtguard.console bench, {m['date']}")
    report.line(f"# machine: {m['cpu']}, {m['cores']} cores, {m['memory_available_mib']} MiB available, "
                f"kernel {m['kernel']}, Python {m['python']}, libvirt {m['libvirt']}, {m['qemu']}, "
                f"{m['ansible_rulebook']}")
    report.line(f"# load average at start: {m['load_average_start']}")
    status = 0
    with Lab(log=report.line) as lab:
        try:
            if "burst" in chosen or "endtoend" in chosen:
                started = time.monotonic()
                burst_hvs = lab.hypervisors_with_domains("bn", options.burst_hypervisors, options.burst_domains)
                report.line(f"# {len(burst_hvs)} session daemons x {options.burst_domains} domains "
                            f"up in {time.monotonic() - started:.1f}s")
            if "burst" in chosen:
                from bench.sidebyside import side_by_side

                report.section("1. Source vs bare libvirt listener, same bursts of real VNC sessions")
                profile = str(Path(options.profile) / "source_burst.prof") if options.profile else None
                result = side_by_side(lab, burst_hvs, options.bursts, options.sessions, options.concurrency,
                                      profile=profile, log=report.line, paced_sessions=options.paced_sessions,
                                      paced_rate=options.paced_rate)
                results["burst"] = result
                report_burst(report, result, options)
                report.section("3. Latency added by the source")
                report_latency(report, result)
            if "endtoend" in chosen:
                from bench.endtoend import end_to_end

                report.section("2. End to end: ansible-rulebook with the shipped audit rulebook "
                               "vs the engine's ceiling")
                result = end_to_end(lab, burst_hvs, options.e2e_rounds, options.e2e_sessions, options.concurrency,
                                    log=report.line, profile=options.profile)
                results["endtoend"] = result
                report_endtoend(report, result)
            if "burst" in chosen or "endtoend" in chosen:
                lab.release(burst_hvs)
            if "scale" in chosen:
                report.section("4. Scale: one source over many hypervisors with many running domains")
                results["scale"] = run_scale(lab, report, options)
                report_scale(report, results["scale"])
            if "soak" in chosen:
                report.section("5. Soak: the source's memory over a long run, stalled and draining consumer")
                results["soak"] = run_soak(lab, options)
                report_soak(report, results["soak"])
            if "audit" in chosen:
                from bench.audit import measure

                report.section("6. The audit writer at its own rate")
                results["audit"] = measure(options.audit_events)
                report_audit(report, results["audit"])
            if "storm" in chosen:
                from bench.storm import measure as storm

                report.section("7. Remediation under attack: a lone session, a storm, a sustained flow, IPv6 rotation")
                results["storm"] = storm(lab, report.line, addresses=options.storm_addresses,
                                         consoles=options.storm_consoles, lone_runs=options.storm_lone,
                                         sustained=options.storm_sustained,
                                         sustained_seconds=options.storm_sustained_seconds,
                                         ipv6_failures=options.storm_ipv6)
                report_storm(report, results["storm"])
            if "fleet" in chosen:
                from bench.fleet_block import measure as fleet_block
                from bench.fleet_scale import measure as fleet_scale

                if options.fleet_hosts:
                    report.section("8. Fleet: one source over remote TLS hypervisor hosts, a partition of all of them")
                    results["fleet"] = fleet_scale(lab, report.line, hosts=options.fleet_hosts,
                                                   workers=options.fleet_workers,
                                                   partition_s=tuple(options.fleet_partition))
                    report_fleet(report, results["fleet"])
                if options.fleet_block_hosts:
                    report.section("9. Fleet-wide block: time until the last host blocks")
                    results["fleet_block"] = fleet_block(report.line, sizes=tuple(options.fleet_block_hosts),
                                                         workers=options.fleet_workers,
                                                         forks=options.fleet_block_forks)
                    report_fleet_block(report, results["fleet_block"])
            if "reconnect" in chosen:
                from bench.reconnect import measure as reconnect

                report.section("10. Reconnections: the source's memory across daemon restarts")
                results["reconnect"] = reconnect(lab, report.line, options.reconnect_rounds)
                report_reconnect(report, results["reconnect"])
            if "resilience" in chosen:
                from bench.resilience import measure as resilience

                report.section("12. Resilience: no single input switches remediation off or turns it against "
                               "its users")
                results["resilience"] = resilience(
                    lab, report.line, lone_runs=options.resilience_lone, followers=options.resilience_followers,
                    domain_rounds=options.resilience_domain_rounds, set_size=options.resilience_set_size,
                    groups=tuple(options.resilience_groups), window_s=options.resilience_window,
                    threshold=options.resilience_threshold, lock_storm=options.resilience_lock_storm,
                    consoles=options.resilience_consoles)
                report_resilience(report, results["resilience"])
            if "blind_starts" in chosen:
                from bench.blind_starts import measure as blind_starts

                report.section("14. Sources started during a storm: never blind for good")
                results["blind_starts"] = blind_starts(lab, report.line, starts=options.blind_starts,
                                                       storms=tuple(options.blind_storms))
                report_blind_starts(report, results["blind_starts"])
            if "libvirtd_memory" in chosen:
                from bench.libvirtd_memory import measure as libvirtd_memory

                report.section("15. libvirtd's memory under a storm: no listener, virsh event, the source")
                results["libvirtd_memory"] = libvirtd_memory(
                    lab, report.line, seconds=options.memory_seconds, clients=options.memory_clients,
                    modes=tuple(options.memory_modes), source_args=json.loads(options.memory_source_args),
                    rate_total=options.memory_rate_total)
                report_libvirtd_memory(report, results["libvirtd_memory"])
            if "second_run" in chosen:
                from bench.second_run import measure as second_run

                report.section("16. A second remediation run beside a young one: the full set and the storm")
                results["second_run"] = second_run(lab, report.line, rounds=options.second_run_rounds,
                                                   waits=tuple(options.second_run_waits),
                                                   busy_delays=tuple(options.second_run_busy_delays))
                report_second_run(report, results["second_run"])
        except KeyboardInterrupt:
            report.line("# interrupted: cleaning up")
            status = 130
        except Exception:
            traceback.print_exc()
            report.line("# the bench failed: cleaning up")
            status = 2
    results["machine"]["load_average_end"] = load_average()
    results["figures"] = report.figures
    results["lost"] = report.lost
    report.line(f"\n# load average at end: {results['machine']['load_average_end']}")
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps(results, indent=2, default=str))
        report.line(f"# all numbers: {options.json}")
    not_met = [f["name"] for f in report.figures if f["met"] is False]
    report.line(f"# goals not met: {', '.join(not_met) if not_met else 'none'}")
    report.line(f"# events lost: {report.lost}")
    if status:
        return status
    return 1 if report.lost else 0


if __name__ == "__main__":
    sys.exit(main())
