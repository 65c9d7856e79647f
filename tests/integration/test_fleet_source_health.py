"""The source's health events and a domain's end over a remote hypervisor host (lab.fleet),
reached as ``qemu+tls://ADDR/system``: a host whose management network is cut goes
``reconnecting`` (keepalive) then ``unreachable`` (the probe gets no answer), with heartbeats all
along, and ``connected`` once healed; a domain destroyed there ends its console session."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from lab.fleet import FleetHost, start_hosts, stop_hosts
from lab.fleet_sessions import FleetClients, open_console_session
from lab.hypervisor import wait_for
from lab.server_view import established_peers
from lab.source_log import SourceLog
from lab.source_runner import SourceRun

pytestmark = pytest.mark.slow

# Keepalive notices a silent connection in about 3 s; the probe of each reconnection waits 1 s.
FAST_RECOVERY = {"keepalive_interval": 1, "keepalive_count": 3, "reconnect_delay": 0.5, "reconnect_max_delay": 2,
                 "connect_timeout": 1}
WAIT = 120.0  # upper limit of a wait for the source across a reconnection


@pytest.fixture(scope="module")
def host() -> Iterator[FleetHost]:
    [made] = start_hosts(["kvm-h"])
    try:
        yield made
    finally:
        stop_hosts([made])


async def test_a_partitioned_host_is_reconnecting_then_unreachable_then_connected_again(host, source_log: SourceLog):
    args = {"uri": host.tls_uri, "snapshot": False, "heartbeat_interval": 0.5, **FAST_RECOVERY}
    try:
        async with SourceRun(args) as run:
            [up] = await run.wait_for_health(1, state="connected", changed=True, timeout=WAIT)
            await asyncio.to_thread(host.partition)
            [lost] = await run.wait_for_health(1, state="reconnecting", changed=True, timeout=WAIT)
            [silent] = await run.wait_for_health(1, state="unreachable", changed=True, timeout=WAIT)
            beats = len(run.health_matching(state="unreachable", changed=False))
            await run.wait_for_health(beats + 2, state="unreachable", changed=False, timeout=WAIT)
            await asyncio.to_thread(host.heal)
            [_up, again] = await run.wait_for_health(2, state="connected", changed=True, timeout=WAIT)
            changes = [e["state"] for e in run.health if e["changed"]]
    finally:
        await asyncio.to_thread(host.heal)
    assert up["hostname"] == again["hostname"] == "kvm-h"
    assert lost["previous"] == "connected"
    assert (silent["previous"], silent["hostname"]) == ("reconnecting", "kvm-h")
    assert silent["reason"] == f"{host.address}:16514 did not answer within 1s"
    assert again["previous"] == "unreachable"
    # while silent, a retry's probe may get no answer again (unreachable) or libvirt may fail
    # otherwise (reconnecting): each change once, never the same state twice in a row
    assert changes[:3] == ["connected", "reconnecting", "unreachable"] and changes[-1] == "connected"
    assert all(a != b for a, b in zip(changes, changes[1:], strict=False))
    assert len(source_log.messages(host.tls_uri, "hypervisor unreachable (was reconnecting)")) >= 1


async def test_a_domain_destroyed_on_a_remote_host_ends_its_session(host, source_log: SourceLog):
    domain = await asyncio.to_thread(host.create_domain, "kvm-h-gone")
    clients = FleetClients(range(24, 32), tag="fh")
    try:
        ns = await asyncio.to_thread(clients.make)
        async with SourceRun({"uri": host.tls_uri, "snapshot": False, **FAST_RECOVERY}) as run:
            await source_log.subscribed(host.tls_uri, run, timeout=WAIT)
            session = await asyncio.to_thread(open_console_session, ns, host, domain)
            port = str(session.port)
            await run.wait_for(2, remote__service=port)
            await asyncio.to_thread(host.virsh, "destroy", domain.name)
            [end] = await run.wait_for(1, remote__service=port, phase="disconnect")
            session.sock.close()
        gone = await asyncio.to_thread(
            wait_for, lambda: session.peer not in established_peers([domain.vnc_port], netns=host.name), 30,
            "the host to drop the connection")
    finally:
        await asyncio.to_thread(host.virsh, "destroy", domain.name, check=False)
        await asyncio.to_thread(clients.delete)
    assert gone
    assert end["session"]["ended_by"] == "domain" and end["snapshot"] is False
    assert end["hypervisor"] == {"uri": host.tls_uri, "hostname": "kvm-h"}
    assert end["remote"]["node"] == ns.client_ip and end["domain"]["uuid"] == domain.uuid
