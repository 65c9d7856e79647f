"""Measurement 9: a fleet-wide block (``virtguard_block_scope: fleet``) through the real
ansible-rulebook running the shipped ``unauthorized_console`` rulebook over N fleet hosts
(tests/lab/fleet.py) by ``qemu+tls``, remediation by Ansible over SSH to every host of the
inventory group ``virtguard_fleet_group``.

An untrusted client opens one session on the last host of the inventory (the one Ansible
would reach last in a run over the group); from just before its connection:
- the time until each host's nftables holds the client's address, taken from the element
  itself (nft lists its timeout and what is left of it, in ms: the element was added
  ``timeout - expires`` before the listing), so polling slowly costs no precision;
- whether its session is gone on that host (the host's sockets and QEMU's client list), and
  when, as libvirt timed it (its connect and disconnect events in the audit);
- the audit's block records, one per host.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.stats import load_average, median
from lab.fleet import FleetHost, ssh_inventory, start_hosts, stop_hosts
from lab.fleet_sessions import FleetClients, open_console_session
from lab.hypervisor import Domain, wait_for
from lab.rulebook_runner import RulebookRun, read_jsonl

CLIENT_INDEXES = range(24, 28)  # lab.netns indexes of this measurement: one untrusted network per fleet size
FLEET_GROUP = "virtguard_hypervisors"
BLOCK_SECONDS = 600
DURATION = re.compile(r"(\d+)(ms|d|h|m|s)")
UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def nft_seconds(text: str) -> float:
    """An nft duration (``9m58s692ms``) in seconds."""
    return sum(int(number) * UNIT_SECONDS[unit] for number, unit in DURATION.findall(text))


def block_added_at(host: FleetHost, table: str, address: str) -> float | None:
    """When (``time.monotonic()``) ``address`` was added to the host's ``blocked_ipv4`` set, from
    the element's timeout and expiry; None while the host does not block it."""
    listed_at = time.monotonic()
    listing = subprocess.run(["ip", "netns", "exec", host.name, "nft", "list", "set", "inet", table, "blocked_ipv4"],
                             capture_output=True, text=True, check=False)
    match = re.search(rf"(?<![\d.]){re.escape(address)} timeout (\S+) expires (\S+?)[,\s}}]", listing.stdout)
    if listing.returncode != 0 or match is None:
        return None
    return listed_at - (nft_seconds(match.group(1)) - nft_seconds(match.group(2)))


def measure(log: Callable[[str], None], sizes: tuple[int, ...] = (3, 10), workers: int = 4,
            forks: int | None = None) -> dict[str, Any]:
    """``forks``: Ansible's forks for the activation's runs (ANSIBLE_FORKS); None, Ansible's default (5)."""
    result: dict[str, Any] = {"load_average_start": load_average(), "forks": forks, "runs": []}
    began = time.monotonic()
    fleet = start_hosts([f"kvm{n}" for n in range(max(sizes))], workers=workers)
    clients = FleetClients(CLIENT_INDEXES, tag="fk")
    try:
        domains = {host.hostname: host.create_domain(f"{host.hostname}-d0") for host in fleet}
        log(f"# fleet block: {len(fleet)} hosts with a domain each up in {time.monotonic() - began:.0f} s")
        for size in sizes:
            run = one_size(fleet[:size], domains, clients, forks)
            cut = "not cut" if run["cut_s"] is None else f"cut {run['cut_s']:.2f} s after its connect"
            log(f"#   {size} hosts: last host blocks {run['last_block_s']:.2f} s after the connection, {cut}")
            result["runs"].append(run)
    finally:
        clients.delete()
        stop_hosts(fleet, workers=8)
    result["load_average_end"] = load_average()
    return result


def one_size(hosts: list[FleetHost], domains: dict[str, Domain], clients: FleetClients,
             forks: int | None) -> dict[str, Any]:
    table = f"vgfk{len(hosts)}"
    work = Path(tempfile.mkdtemp(prefix=f"vgt-bench-fleet-block-{len(hosts)}-", dir=ROOT / "build"))
    names = {host.hostname: host for host in hosts}
    activation = RulebookRun("unauthorized_console", {
        "virtguard_uri": [host.tls_uri for host in hosts],
        "virtguard_trusted_networks": ["192.0.2.0/24"],
        "virtguard_block_scope": "fleet",
        "virtguard_fleet_group": FLEET_GROUP,
        "virtguard_host_map": {host.address: host.hostname for host in hosts},
        "virtguard_block_seconds": BLOCK_SECONDS,
        "virtguard_nft_table": table,
        "virtguard_audit_log": str(work / "audit.jsonl"),
    }, work, inventory=ssh_inventory(names, group=FLEET_GROUP))
    untrusted = clients.make()
    target = hosts[-1]  # last in the inventory: the serving host must not wait for its turn
    saved_forks = os.environ.get("ANSIBLE_FORKS")
    try:
        if forks is not None:  # the activation, ansible-runner and its ansible-playbook runs inherit it
            os.environ["ANSIBLE_FORKS"] = str(forks)
        activation.start(timeout=120)
        wait_for(lambda: activation.output().count("watching graphics events") >= len(hosts), 120,
                 "the activation to watch every host", interval=0.5)
        connected = time.monotonic()
        offender = open_console_session(untrusted, target, domains[target.hostname], check=False)
        cut_at: float | None = None
        added: dict[str, float] = {}
        deadline = connected + 300
        while time.monotonic() < deadline and (len(added) < len(hosts) or cut_at is None):
            for host in hosts:
                if host.hostname not in added:
                    at = block_added_at(host, table, untrusted.client_ip)
                    if at is not None:
                        added[host.hostname] = at
            if cut_at is None and offender.gone():
                cut_at = time.monotonic()
            time.sleep(0.3)
        offender.sock.close()

        def block_records() -> list[dict[str, Any]]:
            return [r for r in read_jsonl(work / "audit.jsonl") if r["record"] == "remediation"
                    and r["action"] == "block" and untrusted.client_ip in r.get("addresses", [])]
        # a run writes its audit records once its module ran on every host (forks at a time)
        deadline = time.monotonic() + 60
        while len({r["target_host"] for r in block_records()}) < len(hosts) and time.monotonic() < deadline:
            time.sleep(0.5)
        records = read_jsonl(work / "audit.jsonl")
        blocks = block_records()
        # the cut as libvirt timed it: the session's connect to its disconnect (as bench/storm.py)
        phases = {r["graphics"]["phase"]: datetime.datetime.fromisoformat(r["graphics"]["timestamp"]).timestamp()
                  for r in records if r["record"] == "event"
                  and r["virtguard"]["remote"]["address"] == untrusted.client_ip}
        times = sorted(at - connected for at in added.values())
        return {"hosts": len(hosts), "blocked_on": len(added), "last_block_s": times[-1] if times else None,
                "first_block_s": times[0] if times else None, "median_block_s": median(times),
                "cut_on_host": cut_at is not None,
                "cut_s": phases["disconnect"] - phases["connect"] if {"connect", "disconnect"} <= set(phases) else None,
                "audit_block_records": len(blocks), "audit_hosts": len({r["target_host"] for r in blocks}),
                "runs": len({r.get("session_id") for r in blocks})}
    finally:
        if saved_forks is None:
            os.environ.pop("ANSIBLE_FORKS", None)
        else:
            os.environ["ANSIBLE_FORKS"] = saved_forks
        activation.stop()
        for host in hosts:
            subprocess.run(["ip", "netns", "exec", host.name, "nft", "delete", "table", "inet", table],
                           capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)
