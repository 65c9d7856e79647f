"""The bruteforce and console_audit rulebooks end to end, with real ansible-rulebook, a real
dual-stack session daemon and clients in network namespaces; blocks judged in nftables and on
the hypervisor's sockets."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import rfb
from lab.hypervisor import Domain, SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl
from lab.server_view import established_peers, nft_blocks

pytestmark = pytest.mark.slow

NFT_TABLE = f"virtguard_b{os.getpid()}"
THRESHOLD = 4


@dataclasses.dataclass
class PlainHypervisor:
    """A dual-stack session daemon, a console without authentication (``domain``, where the
    tests hold sessions) and one with a VNC password (``locked``, where logins fail: leaving a
    console without authentication before initialize is not a failed login)."""

    hv: SessionHypervisor
    domain: Domain
    locked: Domain

    @property
    def uri(self) -> str:
        uri: str = self.hv.uri
        return uri


@pytest.fixture(scope="module")
def plain_hypervisor() -> Iterator[PlainHypervisor]:
    hv = SessionHypervisor("rb", qemu_conf='vnc_listen = "::"\n').start()
    try:
        yield PlainHypervisor(hv, hv.create_domain(f"{hv.user}-d0", listen="::"),
                              hv.create_domain(f"{hv.user}-d1", listen="::", password="unknown"))
    finally:
        hv.stop()


@pytest.fixture
def namespaces() -> Iterator[Callable[[int], ClientNamespace]]:
    made: list[ClientNamespace] = []

    def make(index: int) -> ClientNamespace:
        made.append(ClientNamespace(index, tag="b").create())
        return made[-1]
    yield make
    for ns in made:
        ns.delete()


def failed_login(ns: ClientNamespace, port: int, host: str | None = None, source: str | None = None) -> None:
    """Connect and leave before the handshake: a session that never initializes (on a console
    that asks for a password: ``PlainHypervisor.locked``)."""
    def attempt() -> None:
        sock = socket.create_connection((host or ns.host_ip, port), 5, (source, 0) if source else None)
        sock.recv(12)  # the server's RFB version: QEMU has the client
        sock.close()
    ns.call(attempt)


def activation_for(hv: PlainHypervisor, audit: Path, tmp_path: Path, **more: object) -> RulebookRun:
    return RulebookRun("bruteforce", {
        "virtguard_uri": hv.uri,
        "virtguard_bruteforce_threshold": THRESHOLD,
        "virtguard_bruteforce_window": 30,
        "virtguard_block_seconds": 30,
        "virtguard_audit_log": str(audit),
        "virtguard_nft_table": NFT_TABLE,
        **more,
    }, tmp_path).start()


def test_repeated_failed_logins_block_the_address(plain_hypervisor, namespaces, tmp_path):
    attacker, bystander = namespaces(0), namespaces(1)
    port, locked = plain_hypervisor.domain.vnc_port, plain_hypervisor.locked.vnc_port
    audit = tmp_path / "audit.jsonl"
    activation = activation_for(plain_hypervisor, audit, tmp_path)
    try:
        # the bystander fails less often than the threshold and keeps its session
        failed_login(bystander, locked)
        kept = bystander.call(rfb.open_session, bystander.host_ip, port)
        for _attempt in range(THRESHOLD - 1):
            failed_login(attacker, locked)
        time.sleep(3)
        assert not [r for r in read_jsonl(audit) if r["record"] == "remediation"], "blocked below the threshold"
        # one more failure reaches the threshold; meanwhile the attacker holds a real session
        held = attacker.call(rfb.open_session, attacker.host_ip, port)
        held_client = (ipaddress.ip_address(attacker.client_ip), held.getsockname()[1])
        failed_login(attacker, locked)
        wait_for(lambda: held_client not in established_peers([port]), 60, "the attacker's held session to be cut")
        assert nft_blocks(NFT_TABLE, attacker.client_ip)
        with pytest.raises(ConnectionRefusedError):
            attacker.connect(attacker.host_ip, port, timeout=3)

        def both_records():
            found = {r["action"]: r for r in read_jsonl(audit) if r["record"] == "remediation"}
            return found if len(found) == 2 else None
        records = wait_for(both_records, 20, "the block and cut records")
        assert all(r["ok"] and r["reasons"] == ["bruteforce"] and r["addresses"] == [attacker.client_ip]
                   for r in records.values())
        assert held_client[1] in [c["peer_port"] for c in records["cut"]["result"]["cut"]]
        bystander_client = (ipaddress.ip_address(bystander.client_ip), kept.getsockname()[1])
        assert bystander_client in established_peers([port]), "the bystander's session was cut"
        kept.close()
        held.close()
    finally:
        activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)


def test_failed_logins_from_rotating_ipv6_addresses_block_their_prefix(plain_hypervisor, namespaces, tmp_path):
    """Every attempt from a new address of one /64: counted and blocked per /64, while another
    /64 (a bystander) keeps working."""
    attacker, bystander = namespaces(3), namespaces(4)
    port = plain_hypervisor.locked.vnc_port
    prefix = ipaddress.ip_network(f"{attacker.client_ip6}/64", strict=False)
    rotating = [str(prefix.network_address + 0x100 + n) for n in range(THRESHOLD * 3)]
    probe = str(prefix.network_address + 0x999)  # an address of the /64 that never failed
    for address in rotating + [probe]:
        attacker.run(["ip", "-6", "addr", "add", f"{address}/64", "dev", attacker.ns_link, "nodad"])
    audit = tmp_path / "audit.jsonl"
    activation = activation_for(plain_hypervisor, audit, tmp_path)
    try:
        refused = 0
        for address in rotating:
            try:
                failed_login(attacker, port, attacker.host_ip6, address)
            except ConnectionRefusedError:
                refused += 1
            time.sleep(0.1)
        wait_for(lambda: nft_blocks(NFT_TABLE, str(prefix)), 30, f"{prefix} to be blocked")
        with pytest.raises(ConnectionRefusedError):
            failed_login(attacker, port, attacker.host_ip6, probe)
        failed_login(bystander, port, bystander.host_ip6, bystander.client_ip6)  # another /64: not blocked
        blocks = wait_for(lambda: [r for r in read_jsonl(audit) if r["record"] == "remediation"
                                   and r["action"] == "block"], 20, "the block record")
        assert blocks[0]["networks"] == [str(prefix)] and blocks[0]["reasons"] == ["bruteforce"]
        print(f"ipv6 rotation: {len(rotating)} addresses, {refused} refused once the /64 was blocked")
    finally:
        activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)


def test_a_brute_force_next_to_a_trusted_admin_blocks_the_attacker_not_the_admins_prefix(
        plain_hypervisor, namespaces, tmp_path):
    """The operator gives bruteforce the trusted networks it gives unauthorized_console: an
    attacker in the /64 of a trusted admin is blocked by its own address, the admin keeps its
    console, and a session from outside the trusted networks is not cut by this rulebook."""
    attacker, outsider = namespaces(5), namespaces(6)
    port, locked = plain_hypervisor.domain.vnc_port, plain_hypervisor.locked.vnc_port
    prefix = ipaddress.ip_network(f"{attacker.client_ip6}/64", strict=False)
    admin = str(prefix.network_address + 0x10)
    attacker.run(["ip", "-6", "addr", "add", f"{admin}/64", "dev", attacker.ns_link, "nodad"])
    audit = tmp_path / "audit.jsonl"
    activation = activation_for(plain_hypervisor, audit, tmp_path, virtguard_trusted_networks=[f"{admin}/128"])
    try:
        held = outsider.call(rfb.open_session, outsider.host_ip6, port, source=(outsider.client_ip6, 0))
        outsider_client = (ipaddress.ip_address(outsider.client_ip6), held.getsockname()[1])
        for _attempt in range(THRESHOLD):
            failed_login(attacker, locked, attacker.host_ip6, attacker.client_ip6)
        wait_for(lambda: nft_blocks(NFT_TABLE, f"{attacker.client_ip6}/128"), 30, "the attacker's address blocked")
        blocks = wait_for(lambda: [r for r in read_jsonl(audit) if r["record"] == "remediation"
                                   and r["action"] == "block"], 20, "the block record")
        assert blocks[0]["networks"] == [f"{attacker.client_ip6}/128"]
        assert not nft_blocks(NFT_TABLE, str(prefix)), "the trusted admin's /64 was blocked"
        with pytest.raises(ConnectionRefusedError):
            failed_login(attacker, locked, attacker.host_ip6, attacker.client_ip6)
        attacker.call(lambda: rfb.open_session(attacker.host_ip6, port, source=(admin, 0)).close())  # admin gets in
        assert outsider_client in established_peers([port]), "bruteforce cut an untrusted session"
        held.close()
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
                      if r["record"] == "event" and r["virtguard"]["remote"]["address"] == client.client_ip]
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


def test_failed_logins_from_a_trusted_address_and_a_console_proxy_are_reported_never_blocked(
        plain_hypervisor, namespaces, tmp_path):
    """Before, 5 failed logins through a console proxy (or from a trusted admin's address)
    blocked that address: everyone behind the proxy lost the console, and the same run cut every
    connection from it. Now the brute force is reported (verdict report), nothing is blocked or
    cut, judged on the hypervisor's sockets and nftables."""
    admin = namespaces(7)
    port, locked = plain_hypervisor.domain.vnc_port, plain_hypervisor.locked.vnc_port
    # a loopback address of its own plays the proxy on the hypervisor (websockify, an SSH tunnel)
    proxy = f"127.{100 + os.getpid() % 100}.{os.getpid() // 100 % 250}.7"
    audit = tmp_path / "audit.jsonl"
    activation = activation_for(plain_hypervisor, audit, tmp_path, virtguard_trusted_networks=[admin.network],
                                virtguard_console_proxies=[proxy])
    held = []
    try:
        held.append(admin.call(rfb.open_session, admin.host_ip, port))
        held.append(rfb.open_session("127.0.0.1", port, source=(proxy, 0)))
        kept = {(ipaddress.ip_address(admin.client_ip), held[0].getsockname()[1]),
                (ipaddress.ip_address(proxy), held[1].getsockname()[1])}
        for _attempt in range(THRESHOLD * 2):
            failed_login(admin, locked)
            sock = socket.create_connection(("127.0.0.1", locked), 5, (proxy, 0))
            sock.recv(12)
            sock.close()

        def reports() -> dict[str, int] | None:
            found: dict[str, int] = {}
            for record in read_jsonl(audit):
                if record["record"] == "event" and record["virtguard"]["verdict"] == "report":
                    address = record["virtguard"]["remote"]["address"]
                    found[address] = found.get(address, 0) + 1
            return found if found.get(admin.client_ip) == 2 and found.get(proxy) == 2 else None
        wait_for(reports, 60, "two brute-force reports for each of the admin and the proxy")
        failures = [r["virtguard"] for r in read_jsonl(audit) if r["record"] == "event"
                    and r["virtguard"].get("failed_login")]
        assert len(failures) == THRESHOLD * 4, "every failed login is on record"
        assert "repeated failed console logins from" in activation.output()
        time.sleep(3)  # a remediation run, had one been sent, would have landed by now
        assert not [r for r in read_jsonl(audit) if r["record"] == "remediation"], "a protected address was remediated"
        for address in (admin.client_ip, proxy):
            assert not nft_blocks(NFT_TABLE, address), f"{address} was blocked"
        assert kept <= established_peers([port]), "a protected session was cut"
        rfb.open_session("127.0.0.1", port, source=(proxy, 0)).close()  # users behind the proxy still get in
    finally:
        for sock in held:
            sock.close()
        activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)


def test_clients_dropped_by_an_exclusive_client_on_a_console_without_authentication_are_no_failed_logins(
        plain_hypervisor, namespaces, tmp_path):
    """RFB shared-flag 0 takes the console exclusively: QEMU (share policy allow-exclusive, its
    default) then refuses every shared client at ClientInit, before initialize. On a console
    without authentication that is no failed login: before, those refusals blocked the client."""
    taker, victim = namespaces(8), namespaces(9)
    port = plain_hypervisor.domain.vnc_port
    audit = tmp_path / "audit.jsonl"
    activation = activation_for(plain_hypervisor, audit, tmp_path)
    exclusive = taker.call(rfb.open_session, taker.host_ip, port, shared=False)
    try:
        refused = 0
        for _attempt in range(THRESHOLD * 2):
            try:
                victim.call(rfb.open_session, victim.host_ip, port).close()
            except (ConnectionError, OSError):
                refused += 1
        assert refused == THRESHOLD * 2, "QEMU let a shared client in beside an exclusive one"

        def victim_disconnects() -> list[dict[str, Any]] | None:
            found = [r["virtguard"] for r in read_jsonl(audit) if r["record"] == "event"
                     and r["virtguard"]["remote"]["address"] == victim.client_ip
                     and r["virtguard"]["phase"] == "disconnect"]
            return found if len(found) == THRESHOLD * 2 else None
        disconnects = wait_for(victim_disconnects, 60, "the victim's disconnects on record")
        assert [d["failed_login"] for d in disconnects] == [False] * (THRESHOLD * 2)
        assert all(d["verdict"] == "allow" for d in disconnects)
        time.sleep(3)
        assert not [r for r in read_jsonl(audit) if r["record"] == "remediation"]
        assert not nft_blocks(NFT_TABLE, victim.client_ip)
        exclusive.close()
        victim.call(rfb.open_session, victim.host_ip, port).close()  # the console is the victim's again
    finally:
        exclusive.close()
        activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
