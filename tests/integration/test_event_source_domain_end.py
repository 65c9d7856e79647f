"""A domain that stops (here: ``virsh destroy``) raises no graphics disconnect for its console
clients; the source reports their end from libvirt's lifecycle event, live, or from the snapshot
after a reconnection, with ``session.ended_by: domain``. Real session daemons, real VNC and SPICE
clients; what the hypervisor holds is judged with ``ss`` and QEMU's client list."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from lab import rfb
from lab.hypervisor import Domain, SessionHypervisor, console_holds, wait_for
from lab.server_view import vnc_clients
from lab.source_log import SourceLog
from lab.source_runner import SourceRun
from lab.spice_clients import MAIN_CHANNEL, HeldSpicy, wait_for_channels

pytestmark = pytest.mark.slow

LIVE_ONLY = {"snapshot": False}
MARKER_ADDRESS = "127.0.0.2"  # a marker session's own address: its client port cannot be mistaken


@pytest.fixture
async def doomed(hypervisor: SessionHypervisor) -> AsyncIterator[list[Domain]]:
    """``doomed.append(domain)`` for the domains a test makes to destroy: they are gone after it."""
    made: list[Domain] = []
    yield made
    for domain in made:
        await asyncio.to_thread(hypervisor.destroy_domain, domain.name)


async def new_domain(hypervisor: SessionHypervisor, doomed: list[Domain], tag: str, **kwargs: Any) -> Domain:
    domain = await asyncio.to_thread(hypervisor.create_domain, f"{hypervisor.user}-{tag}", **kwargs)
    doomed.append(domain)
    return domain


async def open_session(port: int) -> tuple[socket.socket, str]:
    sock = await asyncio.to_thread(rfb.open_session, "127.0.0.1", port)
    return sock, str(sock.getsockname()[1])


async def marker_session(run: SourceRun, port: int) -> None:
    """A whole session from MARKER_ADDRESS, until its three events are in: the source's events
    come in order, so whatever libvirt reported before this session has been reported."""
    sock = await asyncio.to_thread(rfb.open_session, "127.0.0.1", port, source=(MARKER_ADDRESS, 0))
    client_port = str(sock.getsockname()[1])
    sock.close()
    await run.wait_for(3, remote__node=MARKER_ADDRESS, remote__service=client_port)


def qemu_serves(hypervisor: SessionHypervisor, domain: Domain, client_port: str) -> bool:
    """Whether the hypervisor still holds the session: its kernel's socket and QEMU's client list."""
    clients = vnc_clients(hypervisor.query_vnc(domain.name))
    return console_holds(domain.vnc_port, int(client_port)) and (ip_address("127.0.0.1"), int(client_port)) in clients


async def test_a_destroyed_domain_ends_its_vnc_session_and_no_other(hypervisor, doomed, source_log: SourceLog):
    victim = await new_domain(hypervisor, doomed, "end-vnc")
    other = hypervisor.domains[0]
    async with SourceRun({"uri": hypervisor.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(hypervisor.uri, run)
        gone, gone_port = await open_session(victim.vnc_port)
        stays, stays_port = await open_session(other.vnc_port)
        try:
            [_connect, opened] = await run.wait_for(2, remote__node="127.0.0.1", remote__service=gone_port)
            await run.wait_for(2, remote__node="127.0.0.1", remote__service=stays_port)
            # a paused domain keeps its clients (the lab's domains run paused)
            await asyncio.to_thread(hypervisor.virsh, "resume", victim.name)
            await asyncio.to_thread(hypervisor.virsh, "suspend", victim.name)
            await marker_session(run, other.vnc_port)
            assert run.matching(remote__service=gone_port, phase="disconnect") == []
            assert await asyncio.to_thread(qemu_serves, hypervisor, victim, gone_port)

            await asyncio.to_thread(hypervisor.virsh, "destroy", victim.name)
            [end] = await run.wait_for(1, remote__node="127.0.0.1", remote__service=gone_port, phase="disconnect")
            await marker_session(run, other.vnc_port)  # anything more the destroy brought is in by now
            ended_by_domain = [e for e in run.events if e["session"].get("ended_by") == "domain"]
            stays_ended = run.matching(remote__service=stays_port, phase="disconnect")
            stays_held = await asyncio.to_thread(qemu_serves, hypervisor, other, stays_port)
            gone_held = await asyncio.to_thread(console_holds, victim.vnc_port, int(gone_port))
        finally:
            stays.close()
            gone.close()
        [stays_end] = await run.wait_for(1, remote__node="127.0.0.1", remote__service=stays_port, phase="disconnect")

    assert end["session"] == {"id": opened["session"]["id"], "authenticated": True, "primary": True, "channels": 0,
                              "duration_s": end["session"]["duration_s"], "duration_exact": True,
                              "ended_by": "domain"}
    assert end["session"]["duration_s"] > 0
    assert end["snapshot"] is False and end["protocol"] == "vnc"
    assert end["domain"] == opened["domain"] and end["domain"]["uuid"] == victim.uuid
    assert end["local"] == opened["local"] and end["auth_scheme"] == "none"
    assert ended_by_domain == [end]  # that session only
    assert not gone_held  # the hypervisor has no such connection any more
    assert stays_ended == [] and stays_held  # the other domain's session is open, there too
    assert stays_end["session"]["ended_by"] == "client"


async def test_a_destroyed_domain_ends_every_channel_of_its_spice_client(hypervisor, doomed, source_log: SourceLog):
    victim = await new_domain(hypervisor, doomed, "end-spice", graphics="spice")
    async with SourceRun({"uri": hypervisor.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(hypervisor.uri, run)
        with HeldSpicy("127.0.0.1", port=victim.vnc_port):
            channels = await asyncio.to_thread(wait_for_channels, hypervisor.virsh, victim.name, 4)
            await run.wait_for(8, domain__name=victim.name)  # connect + initialize per channel
            [main] = [c for c in channels if c["channel-type"] == MAIN_CHANNEL]
            await asyncio.to_thread(hypervisor.virsh, "destroy", victim.name)
            await run.wait_for(1, domain__name=victim.name, phase="disconnect", session__channels=0)
            await marker_session(run, hypervisor.domains[0].vnc_port)
        events = run.matching(domain__name=victim.name)
    ends = [e for e in events if e["phase"] == "disconnect"]
    assert len({e["session"]["id"] for e in events}) == 1
    assert {e["remote"]["service"] for e in ends} == {c["port"] for c in channels}
    assert [e["session"]["channels"] for e in ends] == [3, 2, 1, 0]
    assert [e["session"]["primary"] for e in ends] == [False, False, False, True]
    assert ends[-1]["remote"]["service"] == main["port"]  # the main channel is the primary
    assert {(e["session"]["ended_by"], e["protocol"], e["snapshot"]) for e in ends} == {("domain", "spice", False)}
    assert ends[-1]["session"]["duration_exact"] is True and ends[-1]["session"]["duration_s"] > 0
    assert all("duration_s" not in e["session"] for e in ends[:-1])


async def test_a_snapshot_after_a_reconnection_closes_the_sessions_of_a_domain_destroyed_meanwhile(
        hypervisor, doomed, tmp_path: Path):
    """The source reaches the daemon through a link that the test removes while the daemon
    restarts, so the source is away for sure while the domain is destroyed and a client of
    another domain leaves; then the link comes back and the source reconnects."""
    victim = await new_domain(hypervisor, doomed, "end-away")
    other = hypervisor.domains[1]
    link = tmp_path / "libvirt-sock"
    link.symlink_to(hypervisor.socket)
    uri = f"qemu+unix:///session?socket={link}"
    args = {"uri": uri, "reconnect_delay": 0.2, "reconnect_max_delay": 1, "keepalive_interval": 1}
    gone, gone_port = await open_session(victim.vnc_port)
    leaves, leaves_port = await open_session(other.vnc_port)
    stays, stays_port = await open_session(other.vnc_port)
    try:
        async with SourceRun(args) as run:
            for port in (gone_port, leaves_port, stays_port):
                await run.wait_for(1, remote__service=port, snapshot=True)
            link.unlink()
            await asyncio.to_thread(hypervisor.stop_daemon)
            await asyncio.to_thread(hypervisor.start_daemon)
            await run.wait_for_health(1, state="reconnecting", changed=True)
            await asyncio.to_thread(hypervisor.virsh, "destroy", victim.name)
            leaves.close()
            await asyncio.to_thread(wait_for, lambda: not console_holds(other.vnc_port, int(leaves_port)), 30,
                                    "QEMU to close the connection that left")
            link.symlink_to(hypervisor.socket)
            [gone_end] = await run.wait_for(1, remote__service=gone_port, phase="disconnect")
            [left_end] = await run.wait_for(1, remote__service=leaves_port, phase="disconnect")
            [_first, again] = await run.wait_for(2, remote__service=stays_port, snapshot=True)
            stays_ended = run.matching(remote__service=stays_port, phase="disconnect")
    finally:
        for sock in (gone, leaves, stays):
            sock.close()
    assert gone_end["snapshot"] is True and gone_end["session"]["ended_by"] == "domain"
    assert gone_end["domain"]["uuid"] == victim.uuid
    assert left_end["snapshot"] is True and left_end["session"]["ended_by"] == "client"
    assert again["phase"] == "initialize" and stays_ended == []
