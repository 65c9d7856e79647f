"""The typed identity policy end to end: real gvnccapture clients, each with a client
certificate of its own, log in with SASL to a TLS + SASL console of a real session daemon; the
shipped unauthorized_console rulebook judges them. Every client comes from a trusted network,
so the identity alone decides, and an offending session is cut alone (its exact connection),
never its address: a connection held from the same address stays on the hypervisor.

Judged by the verdict in the audit, the remediation's own records and the hypervisor's sockets
and nftables (gvnccapture leaves by itself right after its screenshot, so the cut record says
whether the session was still there to cut).
"""

from __future__ import annotations

import dataclasses
import ipaddress
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
from lab.tls_console import ConsoleClient, TlsSaslLab

pytestmark = pytest.mark.slow

NFT_TABLE = f"vg_i{os.getpid()}"
DN_LIKE_ACCOUNT = "O=virtguard lab,CN=alice-laptop"  # a SASL account named like alice's DN


@dataclasses.dataclass
class IdentityLab:
    work: Path
    audit: Path
    ns: ClientNamespace
    domain: Domain
    clients: dict[str, ConsoleClient]
    activation: RulebookRun


@pytest.fixture(scope="module")
def idlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityLab]:
    work = tmp_path_factory.mktemp("identity")
    audit = work / "audit.jsonl"
    ns = ClientNamespace(24, tag="i").create()
    hv = SessionHypervisor("id")
    tls_lab = TlsSaslLab(hv.base / "tls", [ns.host_ip])
    activation: RulebookRun | None = None
    try:
        hv.qemu_conf = tls_lab.qemu_conf()
        for user, password in (("alice", "alice-pw"), ("mallory", "mallory-pw"), (DN_LIKE_ACCOUNT, "dn-pw")):
            tls_lab.add_sasl_user(user, password)
        hv.start()
        domain = hv.create_domain(f"{hv.user}-d0", listen="0.0.0.0")
        clients = {"alice": tls_lab.client("ia", "alice-laptop"), "mallory": tls_lab.client("im", "mallory-laptop")}
        activation = RulebookRun("unauthorized_console", {
            "virtguard_uri": hv.uri,
            "virtguard_trusted_networks": [ns.network],
            # alice's DN written with other spacing and case than libvirt reports it
            "virtguard_allowed_identities": [{"x509_dname": "o=Virtguard Lab,  cn=alice-laptop"},
                                             {"sasl_username": "alice"}],
            "virtguard_block_seconds": 30,
            "virtguard_audit_log": str(audit),
            "virtguard_nft_table": NFT_TABLE,
        }, work).start()
        yield IdentityLab(work, audit, ns, domain, clients, activation)
    finally:
        if activation is not None:
            activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
        tls_lab.cleanup()
        hv.stop()
        ns.delete()


def session_events(lab: IdentityLab, sasl_username: str) -> list[dict[str, Any]]:
    """The audit's initialize records of the sessions that logged in as ``sasl_username``."""
    return [r for r in read_jsonl(lab.audit) if r["record"] == "event" and r["graphics"]["phase"] == "initialize"
            and r["graphics"]["identity"].get("sasl_username") == sasl_username]


def log_in(lab: IdentityLab, client: str, username: str, password: str) -> dict[str, Any]:
    """One gvnccapture session, while a plain connection from the same address is held open;
    the initialize record of the session. The held connection must outlive any remediation."""
    before = len(session_events(lab, username))
    held = lab.ns.connect(lab.ns.host_ip, lab.domain.vnc_port)
    held_client = (ipaddress.ip_address(lab.ns.client_ip), held.getsockname()[1])
    try:
        rc, output = lab.clients[client].capture(lab.ns.name, lab.ns.host_ip, lab.domain.vnc_port - 5900,
                                                 username, password)
        assert rc == 0, output
        record: dict[str, Any] = wait_for(lambda: session_events(lab, username)[before:] or None, 30,
                                          f"the initialize of {client}/{username}")[0]
        if record["virtguard"]["verdict"] == "cut":
            wait_for(lambda: [r for r in read_jsonl(lab.audit) if r["record"] == "remediation"
                              and record["virtguard"]["session_id"] in r.get("sessions", [])] or None,
                     60, "the remediation of the session")
        assert held_client in established_peers([lab.domain.vnc_port]), "a connection of the trusted address was cut"
    finally:
        held.close()
    assert not nft_blocks(NFT_TABLE, lab.ns.client_ip), "a trusted address was blocked"
    return record


def test_alices_certificate_with_mallorys_login_is_cut(idlab):
    record = log_in(idlab, "alice", "mallory", "mallory-pw")
    assert record["graphics"]["identity"]["x509dname"] == "O=virtguard lab,CN=alice-laptop"
    assert record["virtguard"]["verdict"] == "cut" and record["virtguard"]["reasons"] == ["identity_not_allowed"]
    batch = next(r for r in read_jsonl(idlab.audit) if r["record"] == "event" and r["virtguard"].get("remediate")
                 and record["virtguard"]["session_id"] in [o["session_id"] for o in r["virtguard"]["batch"]])
    entry = next(o for o in batch["virtguard"]["batch"] if o["session_id"] == record["virtguard"]["session_id"])
    assert entry["block"] is False and entry["client_port"] == record["virtguard"]["remote"]["port"]
    assert batch["virtguard"]["remediation"]["networks"] == []  # nothing blocked: the session alone


def test_alices_certificate_with_alices_login_is_allowed_though_the_entry_is_spelt_otherwise(idlab):
    record = log_in(idlab, "alice", "alice", "alice-pw")
    assert record["virtguard"]["verdict"] == "allow" and record["virtguard"]["reasons"] == []


def test_a_sasl_account_named_like_an_allowed_dn_is_cut(idlab):
    record = log_in(idlab, "mallory", DN_LIKE_ACCOUNT, "dn-pw")
    assert record["graphics"]["identity"]["sasl_username"] == DN_LIKE_ACCOUNT
    assert record["virtguard"]["verdict"] == "cut" and record["virtguard"]["reasons"] == ["identity_not_allowed"]
    # the audit keeps the name exactly, with its escaped form
    full = next(r for r in read_jsonl(idlab.audit) if r["record"] == "event"
                and r["virtguard"]["session_id"] == record["virtguard"]["session_id"] and r.get("identities"))
    assert {"type": "saslUsername", "name": DN_LIKE_ACCOUNT, "escaped": DN_LIKE_ACCOUNT,
            "replacement_characters": False} in full["identities"]
