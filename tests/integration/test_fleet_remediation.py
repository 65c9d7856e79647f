"""The shipped ``unauthorized_console`` rulebook over a fleet (lab.fleet), as a user runs it: the
real ansible-rulebook watching three remote hypervisor hosts over ``qemu+tls://ADDR/system``, and
remediation by Ansible over SSH on the host that serves the console, named in the inventory
``kvm-a``, ``kvm-b``, ``kvm-c`` while the URIs name addresses (``virtguard_host_map``).

Every outcome is judged on the hosts themselves: the block in the host's own nftables
(``ip netns exec HOST nft``), the cut in the host's socket table (``ss`` in its namespace) and in
QEMU's client list. One activation and one fleet serve the module; each test opens its own
client namespaces, and its untrusted clients have networks of their own (a block stays for
BLOCK_SECONDS).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lab.fleet import FleetHost, ssh_inventory
from lab.fleet_activation import FleetLab, fleet_lab
from lab.fleet_sessions import ConsoleSession, FleetClients, open_console_session
from lab.hypervisor import wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import read_jsonl
from lab.server_view import nft_blocks

pytestmark = pytest.mark.slow

NAMES = ("kvm-a", "kvm-b", "kvm-c")  # inventory names, and the hosts' own hostnames
NFT_TABLE = f"vg_f{os.getpid()}"
BLOCK_SECONDS = 300
CUT_TIMEOUT = 120.0  # a limit for a failing test, not a goal: the bench measures speed
TRUSTED_INDEX = 24  # lab.netns index of the trusted clients (the network is the activation's)
UNTRUSTED_INDEXES = {"blocked_on_b": 25, "mapped_by_uri": 26}  # a network of its own per test


def host_map(hosts: dict[str, FleetHost]) -> dict[str, str]:
    """kvm-a by its whole URI, the others by the URI's host (their address)."""
    return {hosts["kvm-a"].tls_uri: "kvm-a", hosts["kvm-b"].address: "kvm-b", hosts["kvm-c"].address: "kvm-c"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[FleetLab]:
    work = tmp_path_factory.mktemp("fleet-remediation")

    def variables(lab: FleetLab) -> dict[str, Any]:
        return {
            "virtguard_trusted_networks": [ClientNamespace(TRUSTED_INDEX).network],
            "virtguard_host_map": host_map(lab.hosts),
            "virtguard_block_seconds": BLOCK_SECONDS,
            "virtguard_nft_table": NFT_TABLE,
        }

    with fleet_lab(NAMES, NAMES, work, variables, ssh_inventory) as lab:
        yield lab


@pytest.fixture
def clients() -> Iterator[FleetClients]:
    made = FleetClients(range(24, 32), tag="fr")
    try:
        yield made
    finally:
        made.delete()


def remediation_records(lab: FleetLab, address: str) -> list[dict[str, Any]]:
    """The audit's block and cut records of ``address``, once both are written."""
    def found() -> list[dict[str, Any]] | None:
        records = remediations(lab, address)
        return records if {"block", "cut"} <= {r["action"] for r in records} else None
    records: list[dict[str, Any]] = wait_for(found, 30, f"the remediation records of {address}", interval=0.3)
    return records


def remediations(lab: FleetLab, address: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(lab.audit) if r["record"] == "remediation" and address in r.get("addresses", [])]


def wait_until_cut(session: ConsoleSession) -> None:
    wait_for(session.gone, CUT_TIMEOUT, f"{session.peer} to be cut on {session.host.hostname}", interval=0.5)


def refused(ns: ClientNamespace, host: FleetHost, port: int) -> bool:
    """Whether a new connection from ``ns`` to ``port`` on ``host`` is refused (the block's reset)."""
    def attempt() -> bool:
        try:
            socket.create_connection((host.address, port), 5).close()
        except ConnectionRefusedError:
            return True
        return False
    result: bool = ns.call(attempt)
    return result


def blocked_on(lab: FleetLab, name: str, address: str) -> bool:
    """Whether host ``name``'s own nftables block ``address`` (no table there: not blocked)."""
    return nft_blocks(NFT_TABLE, address, netns=lab.hosts[name].name)


def test_untrusted_client_of_b_is_blocked_and_cut_on_b_only(fleet: FleetLab, clients: FleetClients):
    trusted = clients.make(TRUSTED_INDEX)
    untrusted = clients.make(UNTRUSTED_INDEXES["blocked_on_b"])
    host_b, domain_b = fleet.hosts["kvm-b"], fleet.domains["kvm-b"]
    bystanders = [open_console_session(trusted, fleet.hosts[name], fleet.domains[name]) for name in NAMES]
    offender = open_console_session(untrusted, host_b, domain_b, check=False)
    try:
        wait_until_cut(offender)
        assert blocked_on(fleet, "kvm-b", untrusted.client_ip)
        assert refused(untrusted, host_b, domain_b.vnc_port), "the blocked client could connect to B again"
        for name in ("kvm-a", "kvm-c"):
            assert not blocked_on(fleet, name, untrusted.client_ip), f"{name} blocks B's offender"
        for session in bystanders:
            assert session.held(), f"the trusted session on {session.host.hostname} was cut"
        records = remediation_records(fleet, untrusted.client_ip)
        assert {r["target_host"] for r in records} == {"kvm-b"}
        assert {r["action"] for r in records} == {"block", "cut"} and all(r["ok"] for r in records), records
        assert not remediations(fleet, trusted.client_ip)
    finally:
        offender.sock.close()
        for session in bystanders:
            session.sock.close()


def test_host_mapped_by_its_whole_uri_is_remediated_on_that_host(fleet: FleetLab, clients: FleetClients):
    """kvm-a's URI is mapped as a whole (not by its address): its untrusted client is blocked and
    cut on kvm-a, by the inventory host of that name."""
    untrusted = clients.make(UNTRUSTED_INDEXES["mapped_by_uri"])
    host_a, domain_a = fleet.hosts["kvm-a"], fleet.domains["kvm-a"]
    offender = open_console_session(untrusted, host_a, domain_a, check=False)
    try:
        wait_until_cut(offender)
        assert blocked_on(fleet, "kvm-a", untrusted.client_ip)
        for name in ("kvm-b", "kvm-c"):
            assert not blocked_on(fleet, name, untrusted.client_ip)
        records = remediation_records(fleet, untrusted.client_ip)
        assert {r["target_host"] for r in records} == {"kvm-a"}
    finally:
        offender.sock.close()
