#!/usr/bin/env bash
# One remediation, live: a libvirt session daemon with a VNC console, a trusted and an
# untrusted client (each in its own network namespace), and the shipped unauthorized_console
# rulebook run by ansible-rulebook. The untrusted client is cut within seconds and refused on
# reconnect; the trusted one keeps its session; the audit log tells the story.
# Then deny first (hacking/demo/firewall_and_remediation.py): a hypervisor host with the
# console_firewall role, where an untrusted client is refused before any session, beside the
# rulebook cutting a trusted-network client that brings no identity.
# Needs root and `make deps`. Cleans up everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_COLLECTIONS_PATH="$PWD/build/collections"
python - <<'PY'
import json, os, socket, subprocess, sys, tempfile, time
from pathlib import Path
sys.path[:0] = ["tests", "build/collections"]
from lab import rfb
from lab.hypervisor import SessionHypervisor
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl

table = f"virtguard_demo{os.getpid()}"
work = Path(tempfile.mkdtemp(prefix="virtguard-demo-"))
audit = work / "audit.jsonl"
hv = trusted = untrusted = activation = None
try:
    print("== a hypervisor with one VNC console, a trusted and an untrusted client")
    hv = SessionHypervisor("demo", qemu_conf='vnc_listen = "0.0.0.0"\n').start()
    domain = hv.create_domain(f"{hv.user}-vm", listen="0.0.0.0")
    trusted, untrusted = ClientNamespace(0, "d").create(), ClientNamespace(1, "d").create()
    print(f"   console port {domain.vnc_port}; trusted {trusted.client_ip}, untrusted {untrusted.client_ip}")
    print("== ansible-rulebook -r virtguard.console.unauthorized_console")
    activation = RulebookRun("unauthorized_console", {
        "virtguard_uri": hv.uri, "virtguard_trusted_networks": [trusted.network],
        "virtguard_block_seconds": 15, "virtguard_audit_log": str(audit), "virtguard_nft_table": table,
    }, work).start()
    kept = trusted.call(rfb.open_session, trusted.host_ip, domain.vnc_port)
    print("   trusted client: session open")
    sock = untrusted.connect(untrusted.host_ip, domain.vnc_port)
    started = time.monotonic()
    print("   untrusted client: connected ...")
    sock.settimeout(15)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    print(f"   untrusted client: cut after {time.monotonic() - started:.2f}s")
    try:
        untrusted.connect(untrusted.host_ip, domain.vnc_port, timeout=3)
        print("   untrusted client: reconnected (unexpected)")
    except ConnectionRefusedError:
        print("   untrusted client: reconnect refused (blocked for 15 s)")
    kept.setblocking(False)
    try:
        kept.recv(1)
    except BlockingIOError:
        print("   trusted client: still connected")
    time.sleep(2)
    print(subprocess.run(["nft", "list", "set", "inet", table, "blocked_ipv4"], capture_output=True, text=True).stdout)
    print(f"== audit log ({audit})")
    for r in read_jsonl(audit):
        if r["record"] == "event":
            g, v = r["graphics"], r["virtguard"]
            print(f"   event  {g['phase']:<10} {g['remote']['node']}:{g['remote']['service']:<6} -> {v['verdict']} {v['reasons']}")
        else:
            print(f"   {r['action']:<6} ok={r['ok']} {json.dumps(r['result'].get('blocked') or r['result'].get('cut'))}")
    kept.close()
finally:
    if activation:
        activation.stop()
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    for ns in (trusted, untrusted):
        if ns:
            ns.delete()
    if hv:
        hv.stop()
    subprocess.run(["rm", "-rf", str(work)])
PY
echo
python hacking/demo/firewall_and_remediation.py
