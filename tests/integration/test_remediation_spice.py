"""SPICE clients against the shipped rulebooks end to end: real ansible-rulebook, a real libvirt
session daemon whose SPICE consoles serve plain and TLS ports, real spicy clients in network
namespaces of their own, real nftables and ``ss -K`` on this host (the lab's hypervisor).

Outcomes are judged on the hypervisor: its established connections (``ss``), QEMU's own list of
SPICE channels (``query-spice``) and the nftables block set, never what a client reads.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.hypervisor import Domain, SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl
from lab.server_view import established_peers, nft_blocks
from lab.spice_clients import HeldSpicy, spice_channels, spice_screenshot, wait_for_channels
from lab.tls_console import TlsSaslLab

pytestmark = pytest.mark.slow

NFT_TABLE = f"vg_sp{os.getpid()}"
CUT_TIMEOUT = 120.0  # a deadline for a failing test, not a goal: the bench measures speed
PASSWORD = "right-pw"


class SpiceLab:
    def __init__(self, hv: SessionHypervisor, tls: TlsSaslLab, ns: dict[str, ClientNamespace],
                 domains: dict[str, Domain], work: Path) -> None:
        self.hv = hv
        self.tls = tls
        self.ns = ns
        self.domains = domains
        self.work = work


@pytest.fixture(scope="module")
def spice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpiceLab]:
    """The SPICE hypervisor (listening on every address, TLS with the lab CA) and client
    namespaces; each test starts the activation it needs."""
    work = tmp_path_factory.mktemp("spice-remediation")
    namespaces = {name: ClientNamespace(index, tag="sp") for index, name in enumerate(("trusted", "untrusted",
                                                                                       "guesser"))}
    hv = SessionHypervisor("rs")
    tls = TlsSaslLab(hv.base / "tls", [ns.host_ip for ns in namespaces.values()])
    hv.qemu_conf = f'spice_listen = "0.0.0.0"\nspice_tls = 1\nspice_tls_x509_cert_dir = "{tls.pki}"\n'
    try:
        for ns in namespaces.values():
            ns.create()
        hv.start()
        domains = {
            "trusted": hv.create_domain(f"{hv.user}-trusted", listen="0.0.0.0", graphics="spice"),
            # its display channel only on the TLS port: a client of both ports
            "both": hv.create_domain(f"{hv.user}-both", listen="0.0.0.0", graphics="spice",
                                     secure_channels=("display",)),
            "password": hv.create_domain(f"{hv.user}-pw", listen="0.0.0.0", graphics="spice", password=PASSWORD),
        }
        yield SpiceLab(hv, tls, namespaces, domains, work)
    finally:
        hv.stop()
        tls.cleanup()
        for ns in namespaces.values():
            ns.delete()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)


def activation(spice: SpiceLab, rulebook: str, **variables: Any) -> RulebookRun:
    workdir = spice.work / f"{rulebook}-{len(list(spice.work.iterdir()))}"
    workdir.mkdir()
    return RulebookRun(rulebook, {"virtguard_uri": spice.hv.uri, "virtguard_nft_table": NFT_TABLE,
                                  "virtguard_audit_log": str(workdir / "audit.jsonl"), **variables}, workdir).start()


def audit(run: RulebookRun) -> list[dict[str, Any]]:
    return read_jsonl(Path(run.variables["virtguard_audit_log"]))


def ports_of(domain: Domain) -> list[int]:
    assert domain.tls_port is not None
    return [domain.vnc_port, domain.tls_port]


def refused(ns: ClientNamespace, host: str, port: int) -> bool:
    try:
        ns.connect(host, port, timeout=3).close()
    except ConnectionRefusedError:
        return True
    return False


def test_an_untrusted_spice_client_is_cut_on_every_channel_of_both_ports_and_refused(spice):
    trusted, untrusted = spice.ns["trusted"], spice.ns["untrusted"]
    both = spice.domains["both"]
    run = activation(spice, "unauthorized_console", virtguard_trusted_networks=[trusted.network])
    try:
        with HeldSpicy(trusted.host_ip, port=spice.domains["trusted"].vnc_port, netns=trusted.name), \
                HeldSpicy(untrusted.host_ip, port=both.vnc_port, tls_port=both.tls_port, ca_pem=spice.tls.ca_pem,
                          netns=untrusted.name):
            bystanders = wait_for_channels(spice.hv.virsh, spice.domains["trusted"].name, 4, host=trusted.client_ip)

            def cut() -> bool:
                return not any(str(peer) == untrusted.client_ip for peer, _port in established_peers(ports_of(both)))

            def cut_recorded() -> bool:
                return any(r["record"] == "remediation" and r["action"] == "cut"
                           and untrusted.client_ip in r.get("addresses", []) for r in audit(run))

            # first the run's cut record (so the client did connect: a spicy slow to start would
            # otherwise leave no connection to find), then the hypervisor's own sockets; every
            # channel of the untrusted client was there on both ports, or went with the cut
            wait_for(cut_recorded, CUT_TIMEOUT, "the remediation's cut record of the untrusted SPICE client",
                     interval=0.5)
            wait_for(cut, CUT_TIMEOUT, "the untrusted SPICE client's connections to be cut", interval=0.5)
            assert not [c for c in spice_channels(spice.hv.virsh, both.name) if c["host"] == untrusted.client_ip]
            assert nft_blocks(NFT_TABLE, untrusted.client_ip)
            for port in ports_of(both):
                assert refused(untrusted, untrusted.host_ip, port), f"port {port} still takes the blocked client"
            # the trusted client on the other console keeps its four channels
            assert wait_for_channels(spice.hv.virsh, spice.domains["trusted"].name, 4, host=trusted.client_ip,
                                     timeout=5) == bystanders
        records = audit(run)
    finally:
        run.stop()
    events = [r for r in records if r["record"] == "event" and r["virtguard"]["remote"]["address"] ==
              untrusted.client_ip]
    sessions = {e["virtguard"]["session_id"] for e in events}
    assert len(sessions) == 1, "one spicy is one session"
    assert {e["graphics"]["protocol"] for e in events} == {"spice"}
    # both ports' channels were this client's, and every verdict but the primary channel's is "channel"
    assert {e["graphics"]["local"]["service"] for e in events} == {str(p) for p in ports_of(both)}
    assert [(e["graphics"]["phase"], e["virtguard"]["verdict"]) for e in events
            if e["graphics"]["session"]["primary"]] == [("connect", "cut"), ("initialize", "cut"),
                                                        ("disconnect", "allow")]
    assert {e["virtguard"]["verdict"] for e in events if not e["graphics"]["session"]["primary"]} == {"channel"}
    cuts = [r for r in records if r["record"] == "remediation" and r["action"] == "cut"
            and untrusted.client_ip in r.get("addresses", [])]
    assert len(cuts) == 1 and cuts[0]["ok"], "one remediation for one client"
    cut_ports = {c["local_port"] for c in cuts[0]["result"]["cut"]}
    assert cut_ports == set(ports_of(both)), cuts[0]["result"]
    assert not [r for r in records if r["record"] == "remediation" and trusted.client_ip in r.get("addresses", [])]


def test_failed_spice_logins_count_once_per_attempt(spice):
    """Wrong passwords with spicy-screenshot: the brute-force block comes at the threshold's
    attempt, not before (each attempt is a main channel that never initializes)."""
    guesser = spice.ns["guesser"]
    domain = spice.domains["password"]
    run = activation(spice, "bruteforce", virtguard_bruteforce_threshold=3, virtguard_bruteforce_window=600)
    try:
        def failed_logins() -> list[dict[str, Any]]:
            return [r for r in audit(run) if r["record"] == "event" and r["graphics"]["phase"] == "disconnect"
                    and r["virtguard"]["remote"]["address"] == guesser.client_ip]

        for attempt in (1, 2):
            status, output = spice_screenshot(guesser.host_ip, port=domain.vnc_port, password="wrong-pw",
                                              netns=guesser.name)
            assert status != 0, output
            wait_for(lambda n=attempt: len(failed_logins()) >= n, 30, f"failed login {attempt} on record")
        assert [e["virtguard"]["verdict"] for e in failed_logins()] == ["allow", "allow"]
        assert not nft_blocks(NFT_TABLE, guesser.client_ip)
        status, output = spice_screenshot(guesser.host_ip, port=domain.vnc_port, password="wrong-pw",
                                          netns=guesser.name)
        assert status != 0, output
        wait_for(lambda: nft_blocks(NFT_TABLE, guesser.client_ip), CUT_TIMEOUT, "the brute-force block")
        assert [e["virtguard"]["verdict"] for e in failed_logins()] == ["allow", "allow", "block"]
        assert refused(guesser, guesser.host_ip, domain.vnc_port)
    finally:
        run.stop()
