"""A domain stopped under an offender ends its session at once, for the source and the filter:
libvirt raises no graphics disconnect when a domain is destroyed, so before, the offender's run
stayed in flight for the whole holdoff and every later offender of that hypervisor waited for
it. Real ansible-rulebook with the shipped unauthorized_console rulebook, a real session daemon
with two consoles, clients in a network namespace; judged on the hypervisor's sockets and
QEMU's own client list."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from typing import Any

import pytest

from lab import rfb
from lab.hypervisor import SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl
from lab.server_view import established_peers, vnc_clients

pytestmark = pytest.mark.slow

NFT_TABLE = f"vg_de{os.getpid()}"
HOLDOFF = 600  # far longer than the test waits: only the domain's end can end the run
CUT_TIMEOUT = 90.0  # a deadline for a failing test, not a goal


def disconnects(audit: Any, address: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(audit) if r["record"] == "event" and r["graphics"]["phase"] == "disconnect"
            and r["virtguard"]["remote"]["address"] == address]


def test_an_offender_whose_domain_is_destroyed_no_longer_holds_the_next_offenders_cut(tmp_path):
    audit = tmp_path / "audit.jsonl"
    ns = ClientNamespace(25, tag="e").create()
    hv: SessionHypervisor | None = None
    activation: RulebookRun | None = None
    held = []
    try:
        first_source, second_source = (f"{ns.client_ip.rpartition('.')[0]}.{n}" for n in (21, 22))
        for source in (first_source, second_source):
            ns.run(["ip", "addr", "add", f"{source}/24", "dev", ns.ns_link])
        hv = SessionHypervisor("de", qemu_conf='vnc_listen = "0.0.0.0"\n').start()
        doomed, other = (hv.create_domain(f"{hv.user}-d{n}", listen="0.0.0.0") for n in range(2))
        activation = RulebookRun("unauthorized_console", {
            "virtguard_uri": hv.uri,
            "virtguard_trusted_networks": ["192.0.2.0/24"],
            "virtguard_remediation_holdoff": HOLDOFF,
            "virtguard_block_seconds": 60,
            "virtguard_audit_log": str(audit),
            "virtguard_nft_table": NFT_TABLE,
        }, tmp_path / "activation").start()

        # the first offender's run is sent at its connect; its domain dies before the cut lands
        held.append(ns.call(rfb.open_session, ns.host_ip, doomed.vnc_port, source=(first_source, 0)))
        hv.destroy_domain(doomed.name)
        ended = wait_for(lambda: disconnects(audit, first_source) or None, 60, "the first offender's disconnect")
        assert ended[0]["graphics"]["session"]["ended_by"] == "domain"
        assert ended[0]["virtguard"]["ended_by"] == "domain" and ended[0]["virtguard"]["failed_login"] is False

        # the next offender, on the other console of the same host, is cut long before the holdoff
        second = ns.call(rfb.open_session, ns.host_ip, other.vnc_port, source=(second_source, 0))
        held.append(second)
        client = (ipaddress.ip_address(second_source), second.getsockname()[1])

        def gone() -> bool:
            return client not in established_peers([other.vnc_port]) | vnc_clients(hv.query_vnc(other.name))
        wait_for(gone, CUT_TIMEOUT, "the second offender's cut on the hypervisor", interval=0.5)
    finally:
        for sock in held:
            sock.close()
        if activation is not None:
            activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
        if hv is not None:
            hv.stop()
        ns.delete()
