"""Nothing outside the activation can stall it: a process that can only read the audit file
holds a real ``flock`` on it (``LOCK_SH``, as a log reader may) while remediation runs.

The audit writers used to wait for that lock without bound: every remediation run hung in its
``audit_record`` task, and once ansible-rulebook had 25 of them running it stopped reading
events, so offenders stayed connected. Now the writers wait at most ``lock_timeout`` seconds
(2 s), every record lost is counted and stated, and the cut, which comes before the audit,
never waits for it.

Judged on the hypervisor (its sockets, QEMU's ``query-vnc``, nftables), in the process table
(no ansible-playbook left) and in the audit file against an independent witness of what should
be in it (``virsh event`` on the hypervisor)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab import rfb
from lab.audit_loss import audit_loss, events_stated_exactly, missing_events, missing_remediations, stated_lost_in_all
from lab.file_lock import HeldLock, exclusive_lock_free
from lab.hypervisor import Domain, EventWitness, SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.remediation_run import eda_extra_vars, run_playbook
from lab.rulebook_runner import RulebookRun, read_jsonl
from lab.server_view import connected_clients, nft_blocks

pytestmark = pytest.mark.slow

NFT_TABLE = f"vg_l{os.getpid()}"
CONSOLES = 5
PER_CONSOLE = 20  # QEMU serves at most 32 shared clients per display
OFFENDERS = CONSOLES * PER_CONSOLE
# Deadlines for a failing test, not goals (bench/ measures speed).
CUT_TIMEOUT = 180.0
PLAYBOOK_TIMEOUT = 120.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Client = tuple[IPAddress, int]


@pytest.fixture
def table() -> Any:
    yield NFT_TABLE
    subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)


def test_a_locked_audit_file_never_holds_up_the_remediation_playbook(tmp_path: Path, table: str) -> None:
    """The playbook alone: its audit task gives up on the lock, the run ends, the block is in
    place, and the run fails saying that the block and the cut succeeded and the audit record
    did not (with the number of records lost)."""
    audit = tmp_path / "audit.jsonl"
    audit.write_bytes(b"")
    extra = eda_extra_vars("CN=mallory", "192.0.2.21", table, str(audit))
    with HeldLock(audit):
        assert not exclusive_lock_free(audit)  # the control: a writer cannot have it
        done = run_playbook(tmp_path, "virtguard.console.remediate_console", extra, timeout=PLAYBOOK_TIMEOUT)
    output = done.stdout + done.stderr
    assert nft_blocks(table, "192.0.2.21/32"), output  # the remediation was done
    assert done.returncode != 0, output  # and the lost audit record is a failure of the run
    assert "block and cut: succeeded; audit record: FAILED, 2 record(s) lost: cannot lock audit log" in output, output
    assert audit.read_bytes() == b""
    # once the reader is gone, the next run is recorded again
    again = run_playbook(tmp_path, "virtguard.console.remediate_console", extra, timeout=PLAYBOOK_TIMEOUT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [(r["action"], r["ok"]) for r in read_jsonl(audit)] == [("block", True), ("cut", True)]


# -- the storm ------------------------------------------------------------------------------


def open_storm(ns: ClientNamespace, sources: list[str], domains: list[Domain]) -> list[tuple[socket.socket, str]]:
    """One held VNC session per source address, spread over the consoles: (socket, source)."""
    def attempt() -> list[tuple[socket.socket, str]]:
        opened = []
        for index, source in enumerate(sources):
            try:
                sock = rfb.open_session(ns.host_ip, domains[index % len(domains)].vnc_port, timeout=10,
                                        source=(source, 0))
            except OSError:
                continue  # cut or refused already: its address was remediated
            opened.append((sock, source))
        return opened
    opened: list[tuple[socket.socket, str]] = ns.call(attempt)
    return opened


def test_a_reader_holding_the_audit_lock_through_a_storm_stalls_nothing_and_every_loss_is_counted(
        tmp_path: Path) -> None:
    """The shipped unauthorized_console rulebook, an audit log that a reader holds locked for
    the whole storm, and 100 offending sessions from 100 untrusted addresses over 5 consoles.

    Every offender is cut (the hypervisor's sockets and QEMU's client lists) and no
    ansible-playbook is left running, while the lock is still held. Then the lock goes, and
    what the activation log states as lost is exactly what is missing from the file:

    * event records: the filter writes one per graphics event, so what should be there is every
      graphics event ``virsh event`` saw on the hypervisor from before the storm until a trusted
      session's disconnect after the release (its record marks the end); missing = that many
      less the file's event records; stated = the last "N record(s) lost in all" of the filter;
    * remediation records: two per playbook run that ran its audit task (the task's banner in
      the activation log); missing = that many less the file's remediation records; stated = the
      sum of "audit record: FAILED, N record(s) lost" in the results of the runs' last play."""
    audit = tmp_path / "audit.jsonl"
    audit.write_bytes(b"")
    storm = ClientNamespace(0, "l")
    trusted = ClientNamespace(1, "l")
    hv: SessionHypervisor | None = None
    witness: EventWitness | None = None
    activation: RulebookRun | None = None
    reader = HeldLock(audit)
    opened: list[tuple[socket.socket, str]] = []
    try:
        storm.create()
        trusted.create()
        hv = SessionHypervisor("al", qemu_conf='vnc_listen = "0.0.0.0"\n').start()
        domains = [hv.create_domain(f"{hv.user}-d{n}", listen="0.0.0.0") for n in range(CONSOLES)]
        activation = RulebookRun("unauthorized_console", {
            "virtguard_uri": hv.uri,
            "virtguard_trusted_networks": [trusted.network],
            "virtguard_audit_log": str(audit),
            "virtguard_nft_table": NFT_TABLE,
            "virtguard_block_seconds": 120,
        }, tmp_path / "activation").start()
        witness = EventWitness(hv.uri, domains[0].name)
        base = storm.client_ip.rsplit(".", 1)[0]
        sources = [f"{base}.{10 + n}" for n in range(OFFENDERS)]
        for source in sources:
            storm.run(["ip", "addr", "add", f"{source}/24", "dev", storm.ns_link])

        reader.hold()
        assert not exclusive_lock_free(audit)  # the control: no writer can have the lock
        opened = open_storm(storm, sources, domains)
        offenders = {(ipaddress.ip_address(source), sock.getsockname()[1]) for sock, source in opened}
        assert len(offenders) >= OFFENDERS * 0.9, "the storm could not open its sessions"
        wait_for(lambda: not connected_clients(hv, domains) & offenders, CUT_TIMEOUT,
                 f"{len(offenders)} offenders to be cut")
        wait_for(lambda: not activation.playbook_runs_left(), PLAYBOOK_TIMEOUT, "the playbook runs to end")
        assert all(nft_blocks(NFT_TABLE, source) for source in sources)
        assert not exclusive_lock_free(audit), "the reader let go of the lock during the storm"
        log = activation.output()
        assert stated_lost_in_all(log), "no loss was stated while the audit file was locked"
        assert "virtguard: appending to the audit log failed" in log  # the audit_error rule fired
        reader.release()

        # A trusted session after the release: its disconnect record is the last one of the test.
        sock = trusted.call(rfb.open_session, trusted.host_ip, domains[0].vnc_port)
        sentinel_port = str(sock.getsockname()[1])
        sock.close()

        def sentinel_recorded() -> bool:
            return any(r["record"] == "event" and r["graphics"]["remote"]["service"] == sentinel_port
                       and r["graphics"]["phase"] == "disconnect" for r in read_jsonl(audit))
        wait_for(sentinel_recorded, 60, "the trusted session's disconnect record")
        wait_for(lambda: "is written again" in activation.output(), 60, "the statement that the audit is written again")
        sentinel_seen = re.compile(rf"event 'graphics' for domain '[^']+': disconnect .*remote\[IPv4 "
                                   rf"{re.escape(trusted.client_ip)} {sentinel_port}\]")
        wait_for(lambda: sentinel_seen.search(witness.output()), 60, "the witness to see the trusted disconnect")
        witnessed = witness.output()
        log = activation.output()
    finally:
        for sock, _source in opened:
            sock.close()
        reader.release()
        if witness is not None:
            witness.close()
        if activation is not None:
            activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
        if hv is not None:
            hv.stop()
        storm.delete()
        trusted.delete()

    counts = audit_loss(witnessed, log, read_jsonl(audit))  # json.loads of every line: only whole records are there
    assert counts["stated_lost_events"] > 0 and counts["stated_lost_remediations"] > 0, counts  # the controls
    assert missing_events(counts) > 0, counts  # the witness saw events the file lacks
    assert events_stated_exactly(counts), counts
    assert counts["stated_lost_remediations"] == missing_remediations(counts), counts
