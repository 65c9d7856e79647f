"""`make demo`, deny first: a hypervisor host of its own (a lab fleet host: network and mount
namespaces, a system libvirtd, sshd, nftables) with one VNC console, one variables file for the
console_firewall role and the unauthorized_console rulebook, and two clients:
- an untrusted one, refused by the firewall at its first packet (a TCP reset): no session, no
  libvirt event (a `virsh event --loop` witness), counted by the firewall's table;
- a trusted-network one that brings no identity. The console has no TLS or SASL, so the identity
  rule shown is `virtguard_require_identity: true` (reason identity_missing): the rulebook cuts
  that session alone, by its exact connection, and never blocks the trusted network.
Stops by itself and removes what it made."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "build" / "collections")]

from lab import rfb  # noqa: E402
from lab.fleet import FleetHost, ssh_inventory  # noqa: E402
from lab.fleet_sessions import FleetClients  # noqa: E402
from lab.hypervisor import EventWitness, wait_for  # noqa: E402
from lab.netns import ClientNamespace  # noqa: E402
from lab.playbook_runs import playbook_env, recap  # noqa: E402
from lab.rulebook_runner import RulebookRun, read_jsonl  # noqa: E402
from lab.server_view import established_peers  # noqa: E402

NAME = "kvm-demo"
TABLE = "virtguard_console_firewall"


def refusal(ns: ClientNamespace, address: str, port: int) -> tuple[str, float]:
    """A new connection from ``ns``: refused or connected, and how long that took."""
    def connect() -> tuple[str, float]:
        began = time.monotonic()
        try:
            socket.create_connection((address, port), 5).close()
            return "connected", time.monotonic() - began
        except ConnectionRefusedError:
            return "refused", time.monotonic() - began
    result: tuple[str, float] = ns.call(connect)
    return result


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="virtguard-demo-firewall-"))
    host = clients = activation = witness = None
    try:
        print("== deny first: a hypervisor host with the console firewall, and the rulebook behind it")
        host = FleetHost(NAME).start()
        domain = host.create_domain(f"{NAME}-vm")
        clients = FleetClients(range(2, 4), tag="df")
        trusted, untrusted = clients.make(2), clients.make(3)
        print(f"   host {NAME} at {host.address} (its own network namespace, system libvirtd, sshd, nftables); "
              f"console port {domain.vnc_port}")
        print(f"   trusted network {trusted.network} (client {trusted.client_ip}), "
              f"untrusted client {untrusted.client_ip}")
        policy = {
            "virtguard_trusted_networks": [trusted.network],
            "virtguard_console_proxies": [],
            "virtguard_require_identity": True,
            "virtguard_nft_table": "virtguard",
            "virtguard_uri": host.tls_uri,
            "virtguard_host_map": {host.address: NAME},
            "virtguard_audit_log": str(work / "audit.jsonl"),
        }
        policy_file, inventory = work / "console_policy.yml", work / "inventory.yml"
        policy_file.write_text(yaml.safe_dump(policy))
        inventory_data = ssh_inventory({NAME: host}, "hypervisors")
        inventory.write_text(yaml.safe_dump(inventory_data))
        print("   one variables file for both (console_policy.yml): virtguard_trusted_networks "
              f"{policy['virtguard_trusted_networks']}, virtguard_console_proxies [], virtguard_require_identity true")

        print("== ansible-playbook virtguard.console.configure_console_firewall -e @console_policy.yml")
        began = time.monotonic()
        proc = subprocess.run([str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(inventory),
                               "virtguard.console.configure_console_firewall", "-e", f"@{policy_file}"],
                              capture_output=True, text=True, env=playbook_env(), cwd=work, check=False)
        counts = recap(proc.stdout, NAME)
        if proc.returncode != 0:
            raise RuntimeError(f"the playbook failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
        print(f"   {NAME}: changed={counts.get('changed')} (the table, libvirt's port ranges in qemu.conf, "
              f"libvirtd restarted) in {time.monotonic() - began:.1f} s")

        print("== ansible-rulebook -r virtguard.console.unauthorized_console --vars console_policy.yml")
        activation = RulebookRun("unauthorized_console", policy, work / "activation", inventory=inventory_data).start()
        witness = EventWitness(host.local_uri, domain.name)

        outcome, seconds = refusal(untrusted, host.address, domain.vnc_port)
        print(f"   untrusted client: {outcome} at its first packet, after {seconds * 1000:.1f} ms "
              "(a TCP reset: no connection, not one byte of RFB)")
        sock = trusted.call(rfb.open_session, host.address, domain.vnc_port)
        started = time.monotonic()
        print("   trusted-network client, no identity (no TLS, no SASL on this console): session open ...")
        client = sock.getsockname()[1]
        try:
            wait_for(lambda: not any(port == client for _address, port in
                                     established_peers([domain.vnc_port], netns=host.name)),
                     60, "the trusted-network client's cut", interval=0.1)
            print(f"   trusted-network client: cut by the rulebook after {time.monotonic() - started:.2f} s "
                  "(judged on the host's sockets), alone: its network is never blocked")
        except TimeoutError:
            print("   trusted-network client: NOT cut within 60 s (the audit log below says what the run did)")
        sock.close()
        events = [line for line in witness.stop(disconnects=1).splitlines() if line.startswith("event 'graphics'")]
        witness = None
        mine = [line.split(": ", 1)[1].split()[0] for line in events if trusted.client_ip in line]
        theirs = [line for line in events if untrusted.client_ip in line]
        print(f"   libvirt's graphics events (virsh event --loop): trusted-network client {', '.join(mine)}; "
              f"untrusted client {len(theirs)} events")
        counter = host.run(["nft", "list", "counter", "inet", TABLE, "refused"]).stdout.split()
        sources = host.run(["nft", "-j", "list", "set", "inet", TABLE, "refused_ipv4_sources"]).stdout
        refused = [e["elem"]["val"] for s in json.loads(sources)["nftables"] if "set" in s
                   for e in s["set"].get("elem", [])]
        print(f"   the firewall's count (nft list counter inet {TABLE} refused): "
              f"{' '.join(counter[counter.index('packets'):][:2])}; refused sources {refused}")
        time.sleep(1)
        print(f"== audit log ({work / 'audit.jsonl'})")
        for record in read_jsonl(work / "audit.jsonl"):
            if record["record"] == "event":
                graphics, verdict = record["graphics"], record["virtguard"]
                remote = f"{graphics['remote']['node']}:{graphics['remote']['service']}"
                print(f"   event  {graphics['phase']:<10} {remote:<22} -> {verdict['verdict']} {verdict['reasons']}")
            elif record["record"] == "remediation":
                result = record["result"]
                detail = result.get("cut") if record["action"] == "cut" else result.get("blocked")
                print(f"   {record['action']:<6} ok={record['ok']} {json.dumps(detail)}")
        blocked = host.run(["nft", "list", "set", "inet", "virtguard", "blocked_ipv4"], check=False).stdout
        print(f"   the trusted network is never blocked: blocked_ipv4 holds {trusted.client_ip}: "
              f"{trusted.client_ip in blocked}")
    except BaseException:
        if activation is not None:
            print(f"== the end of the activation's log\n{activation.output()[-4000:]}", file=sys.stderr)
        raise
    finally:
        if witness is not None:
            witness.close()
        if activation is not None:
            activation.stop()
        if clients is not None:
            clients.delete()
        if host is not None:
            host.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
