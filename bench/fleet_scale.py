"""Measurement 8: one source over a fleet of remote hypervisor hosts (tests/lab/fleet.py, 100 by
default), each a system libvirtd of its own reached as ``qemu+tls://ADDR/system``, with one
running domain and one held console session (so every host's snapshot carries a client and its
delivery can be seen).

The source runs in a process of its own (bench/fleet_source.py) and the hosts' own view of
their events comes from a witness subscribed to each daemon's unix socket (bench/fleet_witness.py),
which a partition of the management network leaves alone. In order:
1. start: from the source's start to every host's snapshot on the queue; the source process's
   RSS then, less its RSS before ``main`` started, per host;
2. a round of live sessions (one opened and closed on every host);
3. every host partitioned at once (TLS and SSH dropped in the host's namespace), a new session
   held on every host meanwhile; then every host healed at once: from the heal to each host
   watched again with its snapshot (the new session) on the queue;
4. another round of live sessions, and the gap's sessions closed; 3 and 4 again for each
   partition length asked for;
5. events lost: every event the hosts raised in 2 and 4 (the witness) against the source's live
   events, by host, client port and phase.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.lab import Lab
from bench.stats import load_average, median, mem_available_mib, percentile, rss_kib
from lab import rfb
from lab.fleet import FleetHost, start_hosts, stop_hosts
from lab.fleet_sessions import FleetClients
from lab.netns import ClientNamespace

CLIENT_INDEXES = range(28, 32)  # lab.netns indexes of this measurement
SESSION_THREADS = 8  # client sessions opened at once


class ChildLines:
    """The JSON lines a child process writes on stdout, collected by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with self._changed:
                    self.lines.append(json.loads(line))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait(self, until: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str) -> bool:
        """Wait until ``until(lines)`` holds; False after ``timeout`` seconds. Raises when the
        process ended first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not until(self.lines):
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{what}: the process ended ({self.proc.returncode})")
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))
            return True

    def snapshot(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self.lines)


def spawn_child(lab: Lab, module_args: list[str], log_name: str) -> ChildLines:
    """``python -m MODULE ARGS...`` with its JSON lines collected; its own log (libvirt's errors,
    the source's connection log: a line per host and reconnection) goes to build/bench/LOG_NAME."""
    logs = ROOT / "build" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / log_name, "w") as log:  # the child writes to its own copy of the descriptor
        proc = lab.spawn([sys.executable, "-m", *module_args], stdout=subprocess.PIPE, stderr=log, text=True)
    return ChildLines(proc)


def open_sessions(ns: ClientNamespace, targets: list[tuple[str, int]]) -> list[socket.socket]:
    """One VNC session (handshake done) from ``ns`` to each (address, port), in order."""
    def all_of_them() -> list[socket.socket]:
        with concurrent.futures.ThreadPoolExecutor(SESSION_THREADS) as pool:
            return list(pool.map(lambda target: rfb.open_session(target[0], target[1], timeout=30), targets))
    result: list[socket.socket] = ns.call(all_of_them)
    return result


def each(hosts: list[FleetHost], action: Callable[[FleetHost], object], workers: int = 16) -> None:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(action, hosts))


def measure(lab: Lab, log: Callable[[str], None], hosts: int = 100, workers: int = 4,
            partition_s: tuple[float, ...] = (40,),
            keepalive_interval: int = 5, keepalive_count: int = 3, reconnect_max_delay: float = 10,
            wait_s: float = 180) -> dict[str, Any]:
    result: dict[str, Any] = {"hosts": hosts, "load_average_start": load_average(),
                              "source_args": {"keepalive_interval": keepalive_interval,
                                              "keepalive_count": keepalive_count,
                                              "reconnect_max_delay": reconnect_max_delay},
                              "partition_s": list(partition_s)}
    memory_before = mem_available_mib()
    began = time.monotonic()
    fleet = start_hosts([f"fleet{n}" for n in range(hosts)], workers=workers)
    clients = FleetClients(CLIENT_INDEXES, tag="fb")
    held: list[socket.socket] = []
    try:
        result["hosts_start_s"] = time.monotonic() - began
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            domains = list(pool.map(lambda host: host.create_domain(f"{host.hostname}-d0"), fleet))
        result["domains_start_s"] = time.monotonic() - began
        result["host_memory_mib"] = (memory_before - mem_available_mib()) / hosts
        log(f"# fleet: {hosts} hosts up in {result['hosts_start_s']:.0f} s, their domains in "
            f"{result['domains_start_s']:.0f} s, {result['host_memory_mib']:.0f} MiB of the machine per host; "
            f"load {load_average()}")
        ports = {host.tls_uri: domain.vnc_port for host, domain in zip(fleet, domains, strict=True)}
        by_local = {host.local_uri: host.tls_uri for host in fleet}
        ns = clients.make()
        targets = [(host.address, ports[host.tls_uri]) for host in fleet]
        held = open_sessions(ns, targets)
        held_port = {host.tls_uri: str(sock.getsockname()[1]) for host, sock in zip(fleet, held, strict=True)}

        witness = spawn_child(lab, ["bench.fleet_witness", *by_local], "fleet_witness.log")
        if not witness.wait(lambda lines: any(line.get("ready") for line in lines), 120, "the witness"):
            raise RuntimeError("the witness did not subscribe to every host in 120 s")

        args_file = Path(tempfile.mkstemp(prefix="vgt-fleet-source-", suffix=".json", dir=ROOT / "build")[1])
        args_file.write_text(json.dumps({"uri": list(ports), **result["source_args"]}))
        source = spawn_child(lab, ["bench.fleet_source", str(args_file)], "fleet_source.log")
        try:
            result.update(start_figures(source, held_port, wait_s))
            log(f"#   start to every snapshot {result['snapshot_s']:.2f} s, "
                f"RSS {result['rss_delta_kib'] / hosts:.0f} KiB per host")
            live = live_round(ns, fleet, ports, source)
            gap_sessions: set[tuple[str, str]] = set()
            result["partitions"] = []
            for seconds in partition_s:
                partition = partition_and_heal(fleet, ns, ports, source, seconds, wait_s, log)
                live |= live_round(ns, fleet, ports, source)
                gap_ports = partition.pop("gap_ports")
                for sock in partition.pop("gap_sockets"):
                    sock.close()
                wait_for_disconnects(source, set(gap_ports.items()))
                gap_sessions |= set(gap_ports.items())
                result["partitions"].append(partition)
            result["rss_end_kib"] = rss_kib(source.proc.pid)
            time.sleep(1)  # the witness's last lines
            result.update(loss_figures(witness.snapshot(), source.snapshot(), by_local, live, gap_sessions))
        finally:
            lab.stop_process(source.proc)
            lab.stop_process(witness.proc)
            args_file.unlink(missing_ok=True)
    finally:
        for sock in held:
            sock.close()
        clients.delete()
        stop_hosts(fleet, workers=8)
    result["load_average_end"] = load_average()
    return result


def start_figures(source: ChildLines, held_port: dict[str, str], wait_s: float) -> dict[str, Any]:
    """Start to every host's snapshot (its held session) on the queue; the source's RSS."""
    def snapshots(lines: list[dict[str, Any]]) -> dict[str, float]:
        return {line["uri"]: line["t"] for line in lines
                if line.get("snapshot") and line.get("phase") == "initialize"
                and held_port.get(line["uri"]) == line["service"]}
    source.wait(lambda lines: len(snapshots(lines)) == len(held_port), wait_s, "every snapshot")
    rss_after = rss_kib(source.proc.pid)
    lines = source.snapshot()
    started = next(line["t"] for line in lines if line.get("started"))
    base = next(line["base_rss_kib"] for line in lines if "base_rss_kib" in line)
    delivered = snapshots(lines)
    watching = {line["uri"]: line["t"] for line in lines if line.get("log") == "watching"}
    return {"snapshot_s": max(delivered.values()) - started if len(delivered) == len(held_port) else None,
            "snapshots_delivered": len(delivered),
            "watching_s": max(watching.values()) - started if len(watching) == len(held_port) else None,
            "snapshot_p50_s": median([t - started for t in delivered.values()]),
            "base_rss_kib": base, "rss_after_snapshots_kib": rss_after, "rss_delta_kib": rss_after - base}


def live_keys(lines: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(line["uri"], line["service"], line["phase"]) for line in lines
            if "phase" in line and not line["snapshot"]}


def live_round(ns: ClientNamespace, fleet: list[FleetHost], ports: dict[str, int],
               source: ChildLines) -> set[tuple[str, str]]:
    """One session opened and closed on every host; returns (uri, client port) of each once the
    source has reported their disconnects (or after 60 s)."""
    socks = open_sessions(ns, [(host.address, ports[host.tls_uri]) for host in fleet])
    made = {(host.tls_uri, str(sock.getsockname()[1])) for host, sock in zip(fleet, socks, strict=True)}
    for sock in socks:
        sock.close()
    wait_for_disconnects(source, made)
    return made


def wait_for_disconnects(source: ChildLines, sessions: set[tuple[str, str]], timeout: float = 60) -> None:
    """Until the source has reported the live disconnect of each (uri, client port), or ``timeout``."""
    closed = {(uri, port, "disconnect") for uri, port in sessions}
    source.wait(lambda lines: closed <= live_keys(lines), timeout, "the sessions' disconnects")


def partition_and_heal(fleet: list[FleetHost], ns: ClientNamespace, ports: dict[str, int], source: ChildLines,
                       partition_s: float, wait_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    uris = {host.tls_uri for host in fleet}
    began = time.monotonic()
    each(fleet, FleetHost.partition)
    partitioned = time.monotonic()
    # a session held on every host while it is cut off: only the snapshot after the heal can report it
    gap_sockets = open_sessions(ns, [(host.address, ports[host.tls_uri]) for host in fleet])
    gap_ports = {host.tls_uri: str(sock.getsockname()[1]) for host, sock in zip(fleet, gap_sockets, strict=True)}

    def after(lines: list[dict[str, Any]], kinds: tuple[str, ...], since: float) -> dict[str, float]:
        found: dict[str, float] = {}
        for line in lines:
            if line.get("log") in kinds and line["t"] >= since:
                found.setdefault(line["uri"], line["t"])
        return found
    source.wait(lambda lines: len(after(lines, ("closed", "lost"), began)) == len(uris), partition_s + 60,
                "every partition noticed")
    time.sleep(max(0.0, began + partition_s - time.monotonic()))
    heal_began = time.monotonic()
    each(fleet, FleetHost.heal)
    healed = time.monotonic()

    def resynchronised(lines: list[dict[str, Any]]) -> dict[str, float]:
        watching = after(lines, ("watching",), heal_began)
        found: dict[str, float] = {}
        for line in lines:
            if (line.get("snapshot") and line.get("phase") == "initialize" and line["t"] >= heal_began
                    and gap_ports.get(line["uri"]) == line["service"] and line["uri"] in watching):
                found.setdefault(line["uri"], max(line["t"], watching[line["uri"]]))
        return found
    source.wait(lambda lines: len(resynchronised(lines)) == len(uris), wait_s, "every host resynchronised")
    lines = source.snapshot()
    noticed = after(lines, ("closed", "lost"), began)
    back = resynchronised(lines)
    attempts = Counter(line["uri"] for line in lines
                       if line.get("log") == "cannot_connect" and began <= line["t"] <= heal_began)
    failures = Counter(line["msg"].split("(", 1)[-1].split(";")[0][:120] for line in lines
                       if line.get("log") == "cannot_connect" and began <= line["t"] <= heal_began)
    resync = sorted(t - heal_began for t in back.values())
    # what one host's connection went through, from the partition on (for the docs)
    first = fleet[0].tls_uri
    timeline = [(round(line["t"] - began, 2), line["msg"][:100]) for line in lines
                if line.get("uri") == first and "log" in line and line["t"] >= began]
    detect = sorted(t - began for t in noticed.values())
    log(f"#   partition noticed after {detect[0]:.1f}..{detect[-1]:.1f} s; resynchronised "
        f"{len(resync)} of {len(uris)}, last {resync[-1] if resync else float('nan'):.1f} s after the heal")
    return {"seconds": partition_s, "partition_apply_s": partitioned - began, "heal_apply_s": healed - heal_began,
            "partition_noticed_s": {"first": detect[0], "median": median(detect), "last": detect[-1]},
            "resynchronised": len(resync),
            "resync_s": {"first": resync[0] if resync else None, "median": median(resync),
                         "p90": percentile(resync, 90), "last": resync[-1] if resync else None},
            "connect_failures_during_partition": {"hosts": len(attempts), "attempts": sum(attempts.values()),
                                                  "reasons": dict(failures.most_common(3))},
            "timeline_of_one_host": timeline, "heal_at_s": heal_began - began,
            "gap_ports": gap_ports, "gap_sockets": gap_sockets}


def loss_figures(witness: list[dict[str, Any]], source: list[dict[str, Any]], by_local: dict[str, str],
                 live_sessions: set[tuple[str, str]], gap_sessions: set[tuple[str, str]]) -> dict[str, Any]:
    """The events the hosts raised for the live rounds' sessions and the gap sessions' ends,
    against the source's live events of them."""
    raised: Counter[tuple[str, str, str]] = Counter()
    for line in witness:
        if "phase" not in line:
            continue
        session = (by_local[line["uri"]], line["service"])
        if session in live_sessions or (session in gap_sessions and line["phase"] == "disconnect"):
            raised[(*session, line["phase"])] += 1
    delivered = Counter((line["uri"], line["service"], line["phase"]) for line in source
                        if "phase" in line and not line["snapshot"]
                        and ((line["uri"], line["service"]) in live_sessions | gap_sessions))
    lost = raised - delivered
    return {"live_events_raised": sum(raised.values()), "live_events_delivered": sum(delivered.values()),
            "live_events_lost": sum(lost.values()), "lost_sample": [list(k) for k in list(lost)[:5]],
            "duplicates": sum(n - 1 for n in delivered.values() if n > 1),
            "expected_per_session_ok": all(n == 1 for n in raised.values())}


def main() -> None:
    """``python -m bench.fleet_scale [HOSTS [PARTITION_S...]]``: this measurement alone, as JSON."""
    with Lab() as lab:
        hosts = int(sys.argv[1]) if len(sys.argv) > 1 else 5
        partition_s = tuple(float(arg) for arg in sys.argv[2:]) or (40,)
        print(json.dumps(measure(lab, print, hosts=hosts, partition_s=partition_s), indent=2))
    os._exit(0)


if __name__ == "__main__":
    main()
