"""The console_firewall role over a fleet (tests/lab/fleet.py): N hypervisor hosts, each with a
running (paused) domain, reached by Ansible over SSH as real ones are, through the
configure_console_firewall playbook and a variables file as the rulebooks read it.

    .venv/bin/python -m bench.firewall_fleet --hosts 100          # docs/performance.md, section 12

Four runs over the whole group, Ansible's forks as configured (default 5, ANSIBLE_FORKS or
--forks), each timed from the command's start to its end:
1. ``--check`` on fresh hosts;
2. the first real run: the table, qemu.conf's four keys, libvirtd's restart (the handler);
3. the second run, which must change nothing;
4. a changed allowed list (one network more), which changes only the table.
After each, the PLAY RECAP of every host is checked (failed and unreachable hosts, changed
counts), and after the first, every host's nftables are asked whether it has the table and
refuses an untrusted client (a connection from the machine, which no allowed network holds).
ansible.posix's profile_tasks reports where the time went. Figures go to stdout and to
build/bench/firewall_fleet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import ROOT
from bench.stats import load_average
from lab.fleet import FleetHost, ssh_inventory, start_hosts, stop_hosts
from lab.playbook_runs import playbook_env, recap

GROUP = "hypervisors"
TABLE = "virtguard_console_firewall"
ALLOWED = ["198.51.100.0/24", "2001:db8:100::/48"]  # no fleet address: the machine is untrusted


def playbook(hosts: list[FleetHost], work: Path, *extra: str, forks: int | None,
             policy: dict[str, Any]) -> dict[str, Any]:
    """One run of configure_console_firewall over every host; its time and each host's recap."""
    (work / "console_policy.yml").write_text(yaml.safe_dump(policy))
    env = playbook_env()
    env["ANSIBLE_CALLBACKS_ENABLED"] = "ansible.posix.profile_tasks"
    env["PROFILE_TASKS_TASK_OUTPUT_LIMIT"] = "8"
    if forks is not None:
        env["ANSIBLE_FORKS"] = str(forks)
    began = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(work / "inventory.yml"),
         "virtguard.console.configure_console_firewall", "-e", f"@{work / 'console_policy.yml'}", *extra],
        capture_output=True, text=True, env=env, cwd=work, timeout=3600, check=False)
    seconds = time.monotonic() - began
    counts = {host.hostname: recap(proc.stdout, host.hostname) for host in hosts}
    changed = sorted({c.get("changed", -1) for c in counts.values()})
    bad = [name for name, c in counts.items() if c.get("failed", 1) or c.get("unreachable", 1)]
    tasks = re.findall(r"^(.+?) -+ (\d+\.\d+)s$", proc.stdout.split("PLAY RECAP", 1)[-1], re.M)
    return {"seconds": round(seconds, 1), "per_host_s": round(seconds / len(hosts), 3), "rc": proc.returncode,
            "changed_per_host": changed, "failed_or_unreachable": bad,
            "slowest_tasks": [(name.strip(), float(s)) for name, s in tasks],
            "tail": "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:]}


def refuses_the_machine(host: FleetHost, port: int) -> bool:
    """Whether a connection from the machine (no allowed network) to ``port`` gets a reset from
    the host's table (its refused counter moves), not from a closed port."""
    def refused_count() -> int:
        out = host.run(["nft", "-j", "list", "counter", "inet", TABLE, "refused"], check=False).stdout
        try:
            return int(next(i["counter"]["packets"] for i in json.loads(out)["nftables"] if "counter" in i))
        except (ValueError, StopIteration):
            return -1
    before = refused_count()
    try:
        socket.create_connection((host.address, port), 5).close()
        return False
    except ConnectionRefusedError:
        return before >= 0 and refused_count() == before + 1


def measure(n_hosts: int, workers: int, forks: int | None) -> dict[str, Any]:
    result: dict[str, Any] = {"hosts": n_hosts, "forks": forks or int(os.environ.get("ANSIBLE_FORKS", 5)),
                              "load_average_start": load_average(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    began = time.monotonic()
    hosts = start_hosts([f"fw{n}" for n in range(n_hosts)], workers=workers)
    work = Path(tempfile.mkdtemp(prefix="vgt-bench-firewall-", dir=ROOT / "build"))
    try:
        ports = {host.hostname: host.create_domain(f"{host.hostname}-d0").vnc_port for host in hosts}
        result["fleet_start_s"] = round(time.monotonic() - began, 1)
        print(f"# {n_hosts} hosts with a domain each up in {result['fleet_start_s']} s; load {load_average()}",
              flush=True)
        (work / "inventory.yml").write_text(yaml.safe_dump(ssh_inventory({h.hostname: h for h in hosts}, GROUP)))
        policy = {"virtguard_trusted_networks": ALLOWED, "virtguard_console_proxies": ["127.0.0.1"]}
        runs = {}
        for name, extra, run_policy in (
                ("check", ["--check"], policy),
                ("first", [], policy),
                ("second", [], policy),
                ("allowed list changed", [], dict(policy, virtguard_trusted_networks=ALLOWED + ["203.0.113.0/24"]))):
            runs[name] = playbook(hosts, work, *extra, forks=forks, policy=run_policy)
            run = runs[name]
            print(f"# {name}: {run['seconds']} s, {run['per_host_s']} s a host; changed per host "
                  f"{run['changed_per_host']}; failed or unreachable {len(run['failed_or_unreachable'])}; "
                  f"load {load_average()}", flush=True)
            if run["tail"]:
                print(run["tail"], flush=True)
            if name == "first":
                result["refusing_hosts"] = sum(refuses_the_machine(h, ports[h.hostname]) for h in hosts)
                print(f"#   hosts whose table refuses an untrusted client: {result['refusing_hosts']} of {n_hosts}",
                      flush=True)
        result["runs"] = runs
    finally:
        stop_hosts(hosts, workers=8)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    result["load_average_end"] = load_average()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.firewall_fleet",
        description="The console_firewall role over a fleet of lab hosts (docs/performance.md, section 12).")
    parser.add_argument("--hosts", type=int, default=100, help="fleet hosts (default 100)")
    parser.add_argument("--workers", type=int, default=4, help="hosts started at once (default 4)")
    parser.add_argument("--forks", type=int, help="Ansible forks (default: Ansible's, 5, or ANSIBLE_FORKS)")
    parser.add_argument("--json", default=str(ROOT / "build" / "bench" / "firewall_fleet.json"))
    options = parser.parse_args()
    result = measure(options.hosts, options.workers, options.forks)
    Path(options.json).parent.mkdir(parents=True, exist_ok=True)
    Path(options.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for name, run in result["runs"].items():
        print(f"{name}: {run['seconds']} s ({run['per_host_s']} s a host); slowest tasks:")
        for task, seconds in run["slowest_tasks"]:
            print(f"    {seconds:7.2f} s  {task}")


if __name__ == "__main__":
    main()
