"""The bruteforce and console_audit rulebooks end to end, with real ansible-rulebook, a real
session daemon and clients in network namespaces."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from lab import rfb
from lab.hypervisor import SessionHypervisor
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl

pytestmark = pytest.mark.slow

NFT_TABLE = f"virtguard_b{os.getpid()}"
THRESHOLD = 4


@pytest.fixture(scope="module")
def plain_hypervisor():
    hv = SessionHypervisor("rb", qemu_conf='vnc_listen = "0.0.0.0"\n').start()
    try:
        hv.domain = hv.create_domain(f"{hv.user}-d0", listen="0.0.0.0")
        yield hv
    finally:
        hv.stop()


@pytest.fixture
def namespaces():
    made = []

    def make(index):
        made.append(ClientNamespace(index, tag="b").create())
        return made[-1]
    yield make
    for ns in made:
        ns.delete()


def failed_login(ns: ClientNamespace, port: int) -> None:
    """Connect and leave before the handshake: a session that never initializes."""
    sock = ns.connect(ns.host_ip, port)
    sock.recv(12)  # the server's RFB version: QEMU has the client
    sock.close()


def test_repeated_failed_logins_block_the_address(plain_hypervisor, namespaces, tmp_path):
    attacker, bystander = namespaces(0), namespaces(1)
    port = plain_hypervisor.domain.vnc_port
    audit = tmp_path / "audit.jsonl"
    activation = RulebookRun("bruteforce", {
        "virtguard_uri": plain_hypervisor.uri,
        "virtguard_bruteforce_threshold": THRESHOLD,
        "virtguard_bruteforce_window": 30,
        "virtguard_block_seconds": 30,
        "virtguard_audit_log": str(audit),
        "virtguard_nft_table": NFT_TABLE,
    }, tmp_path).start()
    try:
        # the bystander fails less often than the threshold and keeps its session
        failed_login(bystander, port)
        kept = bystander.call(rfb.open_session, bystander.host_ip, port)
        for _attempt in range(THRESHOLD - 1):
            failed_login(attacker, port)
        time.sleep(3)
        assert not [r for r in read_jsonl(audit) if r["record"] == "remediation"], "blocked below the threshold"
        # one more failure reaches the threshold; meanwhile the attacker holds a real session
        held = attacker.call(rfb.open_session, attacker.host_ip, port)
        failed_login(attacker, port)
        started = time.monotonic()
        held.settimeout(15)
        try:
            while held.recv(4096):
                pass
        except ConnectionResetError:
            pass
        print(f"bruteforce: threshold reached -> address cut and blocked in {time.monotonic() - started:.2f}s")
        with pytest.raises(ConnectionRefusedError):
            attacker.connect(attacker.host_ip, port, timeout=3)
        deadline = time.monotonic() + 15
        while True:  # the audit step runs after the cut
            records = [r for r in read_jsonl(audit) if r["record"] == "remediation"]
            if len(records) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {r["action"] for r in records} == {"block", "cut"}
        assert all(r["ok"] and r["reasons"] == ["bruteforce"] and r["address"] == attacker.client_ip
                   for r in records)
        kept.setblocking(False)
        with pytest.raises(BlockingIOError):
            kept.recv(1)  # still open
        kept.close()
    finally:
        activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)


def test_console_audit_records_every_event_and_remediates_nothing(plain_hypervisor, namespaces, tmp_path):
    client = namespaces(2)
    port = plain_hypervisor.domain.vnc_port
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"record": "earlier", "kept": true}\n')
    activation = RulebookRun("console_audit", {
        "virtguard_uri": plain_hypervisor.uri,
        "virtguard_trusted_networks": ["192.0.2.0/24"],  # the client is outside: judged, not cut
        "virtguard_audit_log": str(audit),
    }, tmp_path).start()
    try:
        for _attempt in range(3):
            sock = client.call(rfb.open_session, client.host_ip, port)
            sock.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            events = [r for r in read_jsonl(audit)
                      if r["record"] == "event" and r["graphics"]["remote"]["node"] == client.client_ip]
            if len(events) >= 9:
                break
            time.sleep(0.2)
        sessions: dict[str, list[str]] = {}
        for e in events:  # one session's disconnect and the next one's connect may cross
            sessions.setdefault(e["graphics"]["session"]["id"], []).append(e["graphics"]["phase"])
        assert list(sessions.values()) == [["connect", "initialize", "disconnect"]] * 3
        assert all(e["virtguard"]["verdict"] in ("cut", "allow") for e in events)
        assert events[0]["virtguard"]["reasons"] == ["untrusted_network"]
        assert read_jsonl(audit)[0] == {"record": "earlier", "kept": True}
        assert "PLAY [" not in activation.output()
    finally:
        activation.stop()
