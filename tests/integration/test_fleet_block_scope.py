"""A fleet-wide block (``virtguard_block_scope: fleet``) end to end: the shipped
``unauthorized_console`` rulebook run by the real ansible-rulebook over three remote hypervisor
hosts (lab.fleet) by ``qemu+tls``, remediation by Ansible over SSH to every host of the inventory
group named by ``virtguard_fleet_group``.

The inventory also holds a fourth host outside that group (the activation does not watch it):
a fleet-wide block reaches the group, not the whole inventory. Every outcome is judged on the
hosts themselves: the block in each host's own nftables, the cut in the host's socket table and
QEMU's client list, and the audit's records of each host's run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lab.fleet import FleetHost, ssh_inventory
from lab.fleet_activation import FleetLab, fleet_lab
from lab.fleet_sessions import FleetClients, open_console_session
from lab.hypervisor import wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import read_jsonl
from lab.server_view import nft_blocks

pytestmark = pytest.mark.slow

FLEET = ("kvm-a", "kvm-b", "kvm-c")  # the activation's hypervisors, inventory group FLEET_GROUP
OUTSIDER = "kvm-d"  # in the inventory, not in the group, not watched
FLEET_GROUP = "virtguard_hypervisors"
NFT_TABLE = f"vg_s{os.getpid()}"
BLOCK_SECONDS = 300
WAIT = 120.0  # a limit for a failing test, not a goal: the bench measures the time (bench/fleet_block.py)
TRUSTED_INDEX, UNTRUSTED_INDEX = 24, 25  # lab.netns indexes of this module


def fleet_inventory(hosts: dict[str, FleetHost]) -> dict[str, Any]:
    """Every host reached over SSH; only FLEET in FLEET_GROUP."""
    inventory = ssh_inventory(hosts)
    inventory["all"]["children"] = ssh_inventory({name: hosts[name] for name in FLEET}, FLEET_GROUP)["all"]["children"]
    return inventory


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[FleetLab]:
    work = tmp_path_factory.mktemp("fleet-block-scope")

    def variables(lab: FleetLab) -> dict[str, Any]:
        return {
            "virtguard_trusted_networks": [ClientNamespace(TRUSTED_INDEX).network],
            "virtguard_host_map": {lab.hosts[name].address: name for name in FLEET},
            "virtguard_block_scope": "fleet",
            "virtguard_fleet_group": FLEET_GROUP,
            "virtguard_block_seconds": BLOCK_SECONDS,
            "virtguard_nft_table": NFT_TABLE,
        }

    with fleet_lab((*FLEET, OUTSIDER), FLEET, work, variables, fleet_inventory) as lab:
        yield lab


@pytest.fixture
def clients() -> Iterator[FleetClients]:
    made = FleetClients(range(24, 32), tag="fw")
    try:
        yield made
    finally:
        made.delete()


def blocked_on(lab: FleetLab, name: str, address: str) -> bool:
    """Whether host ``name``'s own nftables block ``address`` (no table there: not blocked)."""
    return nft_blocks(NFT_TABLE, address, netns=lab.hosts[name].name)


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


def remediation_records(lab: FleetLab, address: str, hosts: int) -> list[dict[str, Any]]:
    """The audit's block and cut records of ``address``, once every one of ``hosts`` wrote both."""
    def found() -> list[dict[str, Any]] | None:
        records = [r for r in read_jsonl(lab.audit)
                   if r["record"] == "remediation" and address in r.get("addresses", [])]
        done = {(r["target_host"], r["action"]) for r in records}
        return records if len(done) >= 2 * hosts else None
    records: list[dict[str, Any]] = wait_for(found, WAIT, f"block and cut records of {address} from {hosts} hosts",
                                             interval=0.3)
    return records


def test_untrusted_client_of_b_is_blocked_on_every_fleet_host_and_cut_on_b(fleet: FleetLab, clients: FleetClients):
    trusted = clients.make(TRUSTED_INDEX)
    untrusted = clients.make(UNTRUSTED_INDEX)
    host_b, domain_b = fleet.hosts["kvm-b"], fleet.domains["kvm-b"]
    bystanders = [open_console_session(trusted, fleet.hosts[name], fleet.domains[name]) for name in FLEET]
    offender = open_console_session(untrusted, host_b, domain_b, check=False)
    try:
        wait_for(offender.gone, WAIT, f"{offender.peer} to be cut on kvm-b", interval=0.5)
        records = remediation_records(fleet, untrusted.client_ip, len(FLEET))
        for name in FLEET:
            assert blocked_on(fleet, name, untrusted.client_ip), f"{name} does not block B's offender"
            assert refused(untrusted, fleet.hosts[name], fleet.domains[name].vnc_port), \
                f"the blocked client could connect to {name}"
        assert not blocked_on(fleet, OUTSIDER, untrusted.client_ip), "a host outside the fleet group blocks"
        for session in bystanders:
            assert session.held(), f"the trusted session on {session.host.hostname} was cut"

        assert sorted((r["target_host"], r["action"]) for r in records) == sorted(
            (name, action) for name in FLEET for action in ("block", "cut")), records
        assert all(r["ok"] for r in records), records
        cut_by_host = {r["target_host"]: [(c["peer_address"], c["peer_port"]) for c in r["result"].get("cut", [])]
                       for r in records if r["action"] == "cut"}
        assert [(address.removeprefix("::ffff:"), port) for address, port in cut_by_host["kvm-b"]] == \
            [(untrusted.client_ip, offender.port)]
        assert cut_by_host["kvm-a"] == [] and cut_by_host["kvm-c"] == [], "a cut where the offender had no session"
        assert not [r for r in read_jsonl(fleet.audit)
                    if r["record"] == "remediation" and trusted.client_ip in r.get("addresses", [])]
    finally:
        offender.sock.close()
        for session in bystanders:
            session.sock.close()
