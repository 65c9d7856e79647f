"""Measurement 7: remediation under attack, through the real ansible-rulebook running the
shipped ``unauthorized_console`` and ``bruteforce`` rulebooks against a real session daemon,
with clients that each have an address of their own (a network namespace holding thousands
of addresses). Every cut is judged on the hypervisor: the session's connect and disconnect as
libvirt reported them (the audit's event records), and the kernel's connections (``ss``).

- lone: one untrusted session at a time; time from its connect to its cut;
- storm: N untrusted addresses, one held VNC session each, opened within about 2 s, spread
  over the consoles (QEMU serves at most 32 shared clients per display);
- sustained: M untrusted addresses over a minute; the activation's memory, the block sets;
- ipv6: K addresses of one /64 failing logins against the bruteforce rulebook.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import ipaddress
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import ROOT
from bench.audit_tail import AuditTail
from bench.stats import median, percentile, rss_kib
from lab import rfb
from lab.hypervisor import Domain, SessionHypervisor
from lab.netns import VethNamespace
from lab.rulebook_runner import RulebookRun
from lab.server_view import connected_clients, established_peers, nft_blocks

T = TypeVar("T")

NETWORK4 = ipaddress.ip_network("198.18.0.0/16")  # RFC 2544 benchmarking addresses
PORT_BASE = 27000


class AttackerHost(VethNamespace):
    """A network namespace joined to this machine by a veth pair (lab.netns), with as many
    client addresses as a measurement needs (198.18.0.0/16 and one IPv6 /64)."""

    workers = 2

    def __init__(self, tag: str) -> None:
        pid = os.getpid() % 100000
        super().__init__(f"vgb{tag}{pid}"[:15], f"vgbh{tag}{pid}", f"vgbc{tag}{pid}", "198.18.0.1",
                         f"fd7b:{pid % 65536:x}::1", NETWORK4.prefixlen)
        self.prefix6 = ipaddress.ip_network(f"fd7b:{pid % 65536:x}::/64")
        self._next4 = 10
        self._next6 = 16

    def addresses4(self, count: int) -> list[str]:
        """``count`` new IPv4 client addresses, added to the namespace in one batch."""
        made = [str(NETWORK4.network_address + self._next4 + n) for n in range(count)]
        self._next4 += count
        self._batch([f"addr add {a}/16 dev {self.ns_link}" for a in made])
        return made

    def addresses4_in(self, subnet: int, hosts: list[int]) -> list[str]:
        """Addresses ``198.18.SUBNET.HOST``: for measurements that need their clients in /24s of
        their own (the blocks of a full set widen to /24). Take subnets above those
        ``addresses4`` hands out (it starts at 198.18.0.10 and counts up)."""
        made = [str(NETWORK4.network_address + 256 * subnet + host) for host in hosts]
        self._batch([f"addr add {a}/16 dev {self.ns_link}" for a in made])
        return made

    def addresses6(self, count: int) -> list[str]:
        made = [str(self.prefix6.network_address + self._next6 + n) for n in range(count)]
        self._next6 += count
        self._batch([f"addr add {a}/64 dev {self.ns_link} nodad" for a in made])
        return made

    def _batch(self, lines: list[str]) -> None:
        self.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")


def event_seconds(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(record["graphics"]["timestamp"]).timestamp()


class Activation:
    """ansible-rulebook with a shipped rulebook, its audit log read incrementally."""

    def __init__(self, rulebook: str, variables: dict[str, Any], workdir: Path) -> None:
        self.audit = workdir / "audit.jsonl"
        self.run = RulebookRun(rulebook, dict(variables, virtguard_audit_log=str(self.audit)), workdir)
        self.records: list[dict[str, Any]] = []
        self._tail = AuditTail(self.audit)

    def __enter__(self) -> Activation:
        self.run.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.run.stop()

    def read(self) -> list[dict[str, Any]]:
        """Every record so far."""
        self.records += self._tail.read_new()
        return self.records

    def remediations(self, action: str) -> list[dict[str, Any]]:
        return [r for r in self.read() if r["record"] == "remediation" and r["action"] == action]

    def wait_idle(self, timeout: float = 120) -> float | None:
        """Seconds until none of the activation's ansible-playbook runs is left, or None."""
        started = time.monotonic()
        while self.run.playbook_runs_left():
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.2)
        return time.monotonic() - started

    @property
    def proc(self) -> subprocess.Popen[Any]:
        """The running ansible-rulebook."""
        assert self.run.proc is not None, "the activation was not started"
        return self.run.proc

    def rss_kib(self) -> int:
        """Resident memory of the activation: ansible-rulebook's Python and its JVM."""
        pids = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True,
                              check=False).stdout.split()
        total = 0
        for pid in pids:
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith(("ansible-ruleboo", "java", "python")) and "ansible-playboo" not in name:
                total += rss_kib(pid)
        return total


def client_address(peer: str) -> str:
    """A peer address as a dual-stack socket shows it: an IPv4-mapped one as its IPv4 address, a
    link-local one without its zone (as the audit's event records give it)."""
    value = ipaddress.ip_address(peer.split("%", 1)[0])
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return str(value.ipv4_mapped)
    return peer


def sessions_cut(activation: Activation, sources: set[str]) -> dict[tuple[str, int], float]:
    """Sessions of ``sources`` (client address, client port) with their connect-to-cut time in
    seconds, from libvirt's connect and disconnect events, for those a remediation cut."""
    cut = {(client_address(c["peer_address"]), c["peer_port"])
           for r in activation.remediations("cut") for c in r["result"].get("cut", [])}
    connects: dict[tuple[str, int], float] = {}
    latencies: dict[tuple[str, int], float] = {}
    for record in activation.read():
        if record["record"] != "event":
            continue
        key = (record["virtguard"]["remote"]["address"], record["virtguard"]["remote"]["port"])
        if key[0] not in sources:
            continue
        if record["graphics"]["phase"] == "connect":
            connects[key] = event_seconds(record)
        elif record["graphics"]["phase"] == "disconnect" and key in connects and key in cut:
            latencies[key] = event_seconds(record) - connects[key]
    return latencies


def open_sessions(attacker: AttackerHost, host: str, ports: list[int], sources: list[str], threads: int,
                  pace: float | None = None) -> list[tuple[socket.socket, str]]:
    """One held VNC session per source address, console by console; ``pace`` sessions per
    second, or as fast as ``threads`` threads go."""
    def one(index: int) -> tuple[socket.socket, str] | None:
        if pace:
            delay = started + index / pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            return rfb.open_session(host, ports[index % len(ports)], timeout=10, source=(sources[index], 0)), \
                sources[index]
        except OSError:
            return None  # refused or reset: the address is blocked already

    def all_of_them() -> list[tuple[socket.socket, str]]:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return [s for s in pool.map(one, range(len(sources))) if s is not None]

    started = time.monotonic()
    return attacker.call(all_of_them)


def wait_all_gone(ports: list[int], clients: set[tuple[str, int]], timeout: float) -> float | None:
    """Seconds until none of ``clients`` is connected on the hypervisor (kernel's view)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        peers = {(str(a), p) for a, p in established_peers(ports)}
        if not peers & clients:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def wait_cut_on_hypervisor(hv: SessionHypervisor, domains: list[Domain], clients: set[tuple[str, int]],
                           timeout: float) -> float | None:
    """Seconds until none of ``clients`` is connected on the hypervisor: gone from its kernel's
    connections (``ss``, polled often because it is cheap), then absent from QEMU's client lists
    (``query-vnc``, a virsh run per console, so asked only once ``ss`` says they are gone)."""
    started = time.monotonic()
    ports = [d.vnc_port for d in domains]
    while True:
        left = timeout - (time.monotonic() - started)
        if left <= 0 or wait_all_gone(ports, clients, left) is None:
            return None
        if not {(str(a), p) for a, p in connected_clients(hv, domains)} & clients:
            return time.monotonic() - started
        time.sleep(0.2)


def measure(lab: Any, log: Callable[[str], None], addresses: int = 200, consoles: int = 10, lone_runs: int = 5,
            sustained: int = 5000, sustained_seconds: float = 60, ipv6_failures: int = 1000) -> dict[str, Any]:
    conf = (f'vnc_listen = "::"\nremote_display_port_min = {PORT_BASE}\n'
            f"remote_display_port_max = {PORT_BASE + 199}\n")
    hv = SessionHypervisor("st", qemu_conf=conf)
    lab.hypervisors.append(hv)
    attacker = AttackerHost("s").create()
    table = f"vgb{os.getpid() % 100000}"
    result: dict[str, Any] = {"addresses": addresses, "consoles": consoles}
    try:
        hv.start()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            domains = list(pool.map(lambda n: hv.create_domain(f"{hv.user}-d{n}", listen="::"), range(consoles)))
        ports = [d.vnc_port for d in domains]
        workdir = Path(tempfile.mkdtemp(prefix="vgt-bench-storm-", dir=ROOT / "build"))
        variables = {"virtguard_uri": hv.uri, "virtguard_trusted_networks": ["192.0.2.0/24"],
                     "virtguard_nft_table": table, "virtguard_block_seconds": 600}
        with Activation("unauthorized_console", variables, workdir / "unauthorized") as activation:
            result["lone"] = lone(activation, attacker, hv, domains[0], lone_runs, log)
            result["storm"] = storm(activation, attacker, ports, addresses, log)
            if sustained:
                result["sustained"] = sustained_flow(activation, attacker, ports, sustained, sustained_seconds,
                                                     table, log)
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
        if ipv6_failures:
            # a console that asks for a password: a client that leaves before the login ends is a
            # failed login there (on a console without authentication it is none)
            locked = hv.create_domain(f"{hv.user}-pw", listen="::", password="unknown")
            variables = {"virtguard_uri": hv.uri, "virtguard_nft_table": table, "virtguard_bruteforce_threshold": 5,
                         "virtguard_bruteforce_window": 60, "virtguard_block_seconds": 600}
            with Activation("bruteforce", variables, workdir / "bruteforce") as activation:
                result["ipv6"] = ipv6_bruteforce(activation, attacker, [locked.vnc_port], ipv6_failures, table, log)
    finally:
        attacker.delete()
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
        lab.release([hv])
    return result


def lone(activation: Activation, attacker: AttackerHost, hv: SessionHypervisor, domain: Domain, runs: int,
         log: Callable[[str], None]) -> dict[str, Any]:
    latencies = []
    for _run in range(runs):
        latency, _source = lone_offender(activation, attacker, hv, domain)
        if latency is not None:
            latencies.append(latency)
        time.sleep(1)
    log(f"#   lone sessions, connect to cut: {', '.join(f'{s:.2f}' for s in latencies)} s")
    return {"runs": runs, "cut": len(latencies), "latencies_s": latencies,
            "p50_s": median(latencies) if latencies else None}


def lone_offender(activation: Activation, attacker: AttackerHost, hv: SessionHypervisor, domain: Domain,
                  idle_first: bool = True) -> tuple[float | None, str]:
    """One untrusted session from a new address, alone on ``domain``'s console, once no playbook
    run of the activation is left (unless not ``idle_first``): its connect-to-cut time
    (libvirt's), or None when it was not cut (still on the hypervisor after 60 s, or no cut
    record of it 30 s later); and the address."""
    if idle_first:
        activation.wait_idle()
    source = attacker.addresses4(1)
    opened = open_sessions(attacker, attacker.host_ip, [domain.vnc_port], source, 1)
    clients = {(source[0], sock.getsockname()[1]) for sock, _s in opened}
    try:
        if not opened or wait_cut_on_hypervisor(hv, [domain], clients, 60) is None:
            return None, source[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cut = sessions_cut(activation, set(source))
            if cut:
                return max(cut.values()), source[0]
            time.sleep(0.2)
        return None, source[0]
    finally:
        for sock, _source in opened:
            sock.close()


def storm(activation: Activation, attacker: AttackerHost, ports: list[int], count: int,
          log: Callable[[str], None]) -> dict[str, Any]:
    sources = attacker.addresses4(count)
    runs_before = len(activation.remediations("block"))
    started = time.monotonic()
    opened = open_sessions(attacker, attacker.host_ip, ports, sources, threads=len(ports))
    open_s = time.monotonic() - started
    clients = {(source, sock.getsockname()[1]) for sock, source in opened}
    gone_s = wait_all_gone(ports, clients, 120)
    activation.wait_idle()  # the last runs' audit records (a fixed wait missed them on a busy machine)
    cut = sessions_cut(activation, set(sources))
    runs = [r for r in activation.remediations("block")[runs_before:] if set(r.get("addresses", [])) & set(sources)]
    for sock, _source in opened:
        sock.close()
    values = sorted(cut.values())
    log(f"#   storm: {len(opened)} sessions opened in {open_s:.2f}s, all gone on the hypervisor after "
        f"{gone_s if gone_s is None else round(gone_s, 2)}s, {len(runs)} runs")
    return {"opened": len(opened), "open_s": open_s, "gone_s": gone_s, "cut": len(set(cut) & clients),
            "not_cut": len(clients - set(cut)), "runs": len(runs),
            "batch_sizes": [r.get("batch_size") for r in runs],
            "p50_s": percentile(values, 50) if values else None, "max_s": values[-1] if values else None}


def sustained_flow(activation: Activation, attacker: AttackerHost, ports: list[int], count: int, seconds: float,
                   table: str, log: Callable[[str], None]) -> dict[str, Any]:
    sources = attacker.addresses4(count)
    rss: list[int] = [activation.rss_kib()]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(1.0):
            rss.append(activation.rss_kib())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    opened = open_sessions(attacker, attacker.host_ip, ports, sources, threads=8, pace=count / seconds)
    open_s = time.monotonic() - started
    clients = {(source, sock.getsockname()[1]) for sock, source in opened}
    gone_s = wait_all_gone(ports, clients, 180)
    time.sleep(3)
    sampling.set()
    sampler.join()
    cut = sessions_cut(activation, set(sources))
    alive = activation.proc.poll() is None
    for sock, _source in opened:
        sock.close()
    sets = {}
    for name in ("blocked_ipv4", "blocked_ipv6", "blocked_ipv6_p64"):
        listing = subprocess.run(["nft", "-j", "list", "set", "inet", table, name], capture_output=True, text=True,
                                 check=False)
        data = json.loads(listing.stdout)["nftables"] if listing.returncode == 0 else []
        for item in data:
            if "set" in item:
                sets[name] = {"elements": len(item["set"].get("elem", [])), "size": item["set"].get("size")}
    log(f"#   sustained: {len(opened)} sessions over {open_s:.0f}s, gone {gone_s}s after the last, "
        f"{len(set(cut) & clients)} cut, RSS {rss[0] // 1024}..{max(rss) // 1024} MiB")
    return {"addresses": count, "opened": len(opened), "open_s": open_s, "gone_after_last_s": gone_s,
            "cut": len(set(cut) & clients), "not_cut": len(clients - set(cut)), "alive": alive,
            "rss_kib_start": rss[0], "rss_kib_max": max(rss), "rss_kib_end": rss[-1], "sets": sets,
            "runs": len([r for r in activation.remediations("block") if set(r.get("addresses", [])) & set(sources)])}


def ipv6_bruteforce(activation: Activation, attacker: AttackerHost, ports: list[int], count: int, table: str,
                    log: Callable[[str], None]) -> dict[str, Any]:
    sources = attacker.addresses6(count)
    prefix = str(attacker.prefix6)

    def fail_logins() -> dict[str, Any]:
        attempts = refused = 0
        first_refused: float | None = None
        for index, source in enumerate(sources):
            port = ports[index % len(ports)]
            time.sleep(0.01)  # about 100 addresses a second, each a new one
            try:
                sock = socket.create_connection((attacker.host_ip6, port), 5, (source, 0))
            except OSError:
                refused += 1
                first_refused = first_refused or time.monotonic()
                continue
            attempts += 1
            try:
                sock.recv(12)  # QEMU has the client; leave before the handshake: a failed login
            except OSError:
                pass
            sock.close()
        return {"attempts": attempts, "refused": refused, "first_refused": first_refused}

    started = time.monotonic()
    counts = attacker.call(fail_logins)
    deadline = time.monotonic() + 60
    while not nft_blocks(table, prefix) and time.monotonic() < deadline:
        time.sleep(0.2)
    blocked = nft_blocks(table, prefix)
    first_refused = counts.pop("first_refused")
    refused_after = None if first_refused is None else first_refused - started
    elapsed = time.monotonic() - started
    time.sleep(3)  # the run's audit records
    runs = activation.remediations("block")
    networks = sorted({n for r in runs for n in r.get("networks", [])})
    log(f"#   ipv6 brute force: {counts['attempts']} logins got through, {counts['refused']} refused, "
        f"{prefix} blocked: {blocked}, networks blocked: {networks}")
    return {"addresses": count, "prefix": prefix, "blocked": blocked, "networks": networks, "runs": len(runs),
            "seconds": elapsed, "refused_from_s": refused_after, **counts}
