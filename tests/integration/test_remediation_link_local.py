"""A link-local console client among the offenders, end to end: the shipped unauthorized_console
rulebook (real ansible-rulebook) against a session daemon whose VNC listens on ``::``, a client
namespace whose veth has link-local addresses, and IPv4 offenders from another namespace.

The hypervisor's socket of a link-local client is bound to its interface, and ss prints its end
as ``[fe80::…]%IFACE:PORT``. ss refuses a zone in a filter: the cut of such a client used to
fail its whole ``ss -K`` command, the block still landed (its reject rule eats the client's FIN,
so the hypervisor kept the connection for good), the client stayed in every later batch, and so
no later offender of the host was ever cut. Every outcome is judged on the hypervisor: its
sockets (``ss``) and QEMU's client list (``query-vnc``), then the audit's cut records.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab import rfb
from lab.hypervisor import SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl
from lab.server_view import established_peers, vnc_clients

pytestmark = pytest.mark.slow

NFT_TABLE = f"vg_ll{os.getpid()}"
OFFENDERS = 4
CUT_TIMEOUT = 120.0  # a deadline for a failing test, not a goal
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Client = tuple[IPAddress, int]  # (client address, client port) as the hypervisor sees it


def peer_address(text: str) -> IPAddress:
    """A peer address as a hypervisor socket shows it: an IPv4-mapped one is its IPv4 address."""
    value = ipaddress.ip_address(text)
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return value.ipv4_mapped
    return value


def cut_records(audit: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(audit) if r["record"] == "remediation" and r["action"] == "cut"]


def reported_cut(audit: Path) -> set[Client]:
    """(client address, client port) of every connection a cut record reports cut."""
    return {(peer_address(c["peer_address"]), c["peer_port"])
            for r in cut_records(audit) for c in r["result"].get("cut", [])}


def test_a_link_local_offender_is_cut_and_never_keeps_later_offenders_from_being_cut(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    hv: SessionHypervisor | None = None
    namespaces: list[ClientNamespace] = []
    activation: RulebookRun | None = None
    held: list[socket.socket] = []
    try:
        link = ClientNamespace(0, tag="l", link_local=True).create()
        namespaces.append(link)
        ipv4 = ClientNamespace(1, tag="l").create()
        namespaces.append(ipv4)
        base = ipv4.client_ip.rsplit(".", 1)[0]
        sources = [f"{base}.{10 + n}" for n in range(OFFENDERS)]
        for source in sources:
            ipv4.run(["ip", "addr", "add", f"{source}/24", "dev", ipv4.ns_link])
        hv = SessionHypervisor("rl", qemu_conf='vnc_listen = "::"\n').start()
        domain = hv.create_domain(f"{hv.user}-d0", listen="::")
        activation = RulebookRun("unauthorized_console", {
            "virtguard_uri": [hv.uri],
            # neither the link-local client nor the IPv4 offenders
            "virtguard_trusted_networks": ["198.51.100.0/24", "2001:db8:77::/48"],
            "virtguard_block_seconds": 60,
            "virtguard_remediation_holdoff": 5,
            "virtguard_audit_log": str(audit),
            "virtguard_nft_table": NFT_TABLE,
        }, tmp_path / "activation").start()
        assert link.host_ll is not None and link.client_ll is not None

        # the link-local client first: its batch is remediated before the others come
        first = link.call(rfb.open_session, f"{link.host_ll}%{link.ns_link}", domain.vnc_port)
        held.append(first)
        link_local = (ipaddress.ip_address(link.client_ll), first.getsockname()[1])
        shown = subprocess.run(["ss", "-t", "-n", "-H", "state", "established", f"( sport = :{domain.vnc_port} )"],
                               capture_output=True, text=True, check=True).stdout
        assert f"[{link.host_ll}]%{link.host_link}:{domain.vnc_port}" in shown  # the form ss could not take back
        wait_for(lambda: cut_records(audit), 60, "the link-local client's remediation", interval=0.3)

        def open_offenders() -> list[socket.socket]:
            return [rfb.open_session(ipv4.host_ip, domain.vnc_port, source=(source, 0)) for source in sources]
        offenders = ipv4.call(open_offenders)
        held += offenders
        clients = {link_local} | {(ipaddress.ip_address(source), sock.getsockname()[1])
                                  for source, sock in zip(sources, offenders, strict=True)}

        def still_connected() -> set[Client]:
            return (established_peers([domain.vnc_port]) | vnc_clients(hv.query_vnc(domain.name))) & clients
        try:
            wait_for(lambda: not still_connected(), CUT_TIMEOUT, "every offender to be cut", interval=0.5)
        except TimeoutError:
            raise AssertionError(f"still connected on the hypervisor: {sorted(map(str, still_connected()))}; "
                                 f"cut records: {cut_records(audit)}") from None

        wait_for(lambda: clients <= reported_cut(audit), 30, "the cut records of every offender", interval=0.3)
        # the default /64 prefix never applies to link-local: fe80::/64 is every link's clients
        blocks = [r for r in read_jsonl(audit) if r["record"] == "remediation" and r["action"] == "block"]
        blocked = {ipaddress.ip_network(n) for r in blocks for n in r["networks"]}
        assert ipaddress.ip_network(f"{link.client_ll}/128") in blocked, blocked
        assert ipaddress.ip_network("fe80::/64") not in blocked, blocked
        ours = [r for r in cut_records(audit)
                if {(peer_address(c["peer_address"]), c["peer_port"]) for c in r["result"]["cut"]} & clients]
        assert ours and all(r["ok"] and r["result"]["failed"] == [] and r["result"]["verified"] for r in ours), ours
    finally:
        for sock in held:
            sock.close()
        if activation is not None:
            activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
        if hv is not None:
            hv.stop()
        for ns in namespaces:
            ns.delete()
