"""The event source over a fleet of remote hypervisor hosts (lab.fleet): three hosts, each a
system libvirtd of its own reached as ``qemu+tls://ADDR/system`` or ``qemu+ssh://root@ADDR/system``,
with console clients in namespaces of their own (lab.netns) routed to them.

What the source reports is compared with what the hosts themselves hold (QEMU's ``query-vnc`` on
the host, libvirt's domain list): a session on host B is B's, a partitioned host is resynchronised
by snapshot once its management network is back, and a host whose libvirtd was killed and started
again is watched again. One fleet serves the module; each test opens its own client namespaces
and sessions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from lab.fleet import FleetHost, start_hosts, stop_hosts
from lab.fleet_sessions import ConsoleSession, FleetClients, open_console_session
from lab.hypervisor import Domain
from lab.netns import ClientNamespace
from lab.source_log import SourceLog
from lab.source_runner import SourceRun

pytestmark = pytest.mark.slow

HOSTNAMES = ("kvm-a", "kvm-b", "kvm-c")
# Keepalive notices a silent connection in about 3 s, and a reconnection is tried at least every
# 2 s: a failing test ends within its waits' limits (never a goal: the bench measures times).
FAST_RECOVERY = {"keepalive_interval": 1, "keepalive_count": 3, "reconnect_delay": 0.5, "reconnect_max_delay": 2}
WAIT = 120.0  # upper limit of a wait for the source across a reconnection (TCP SYN backoff included)
CLIENT_INDEXES = range(24, 32)  # lab.netns indexes of this module (one test at a time)


class Fleet:
    def __init__(self, hosts: list[FleetHost]) -> None:
        self.hosts = dict(zip(HOSTNAMES, hosts, strict=True))
        self.domains: dict[str, Domain] = {}

    def uri(self, hostname: str, transport: str) -> str:
        host = self.hosts[hostname]
        return host.tls_uri if transport == "tls" else host.ssh_uri


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    hosts = start_hosts(HOSTNAMES)
    try:
        fleet = Fleet(hosts)
        for hostname, host in fleet.hosts.items():
            fleet.domains[hostname] = host.create_domain(f"{hostname}-d0")
        yield fleet
    finally:
        stop_hosts(hosts)


@pytest.fixture
def clients() -> Iterator[Callable[[], ClientNamespace]]:
    """``clients()`` makes a client namespace that reaches every host of the fleet; each is
    deleted after the test."""
    made = FleetClients(CLIENT_INDEXES, tag="fs")
    try:
        yield made.make
    finally:
        made.delete()


async def open_session(fleet: Fleet, ns: ClientNamespace, hostname: str) -> ConsoleSession:
    """A session from ``ns`` to the domain of ``hostname``, which the host holds once this returns."""
    return await asyncio.to_thread(open_console_session, ns, fleet.hosts[hostname], fleet.domains[hostname])


async def close_session(session: ConsoleSession) -> None:
    """Close the client's end and wait until the host has let go of the session."""
    await asyncio.to_thread(session.close)


@pytest.mark.parametrize("transport", ["tls", "ssh"])
async def test_sessions_on_one_host_are_reported_with_that_hosts_uri_only(
        fleet: Fleet, clients, transport: str, source_log: SourceLog):
    uris = {hostname: fleet.uri(hostname, transport) for hostname in HOSTNAMES}
    first, second = clients(), clients()
    domain_b = fleet.domains["kvm-b"]
    async with SourceRun({"uri": list(uris.values()), "snapshot": False}) as run:
        for uri in uris.values():
            await source_log.subscribed(uri, run, timeout=60)
        sessions = [await open_session(fleet, ns, "kvm-b") for ns in (first, second)]
        for session in sessions:
            await close_session(session)
        reported = [await run.wait_for(3, remote__node=session.ns.client_ip) for session in sessions]
        on_b = list(run.events)
        # A session on C afterwards is reported with C's URI: the source does watch the others.
        await close_session(await open_session(fleet, first, "kvm-c"))
        on_c = await run.wait_for(3, hypervisor__uri=uris["kvm-c"])

    for session, events in zip(sessions, reported, strict=True):
        assert [e["phase"] for e in events] == ["connect", "initialize", "disconnect"]
        for event in events:
            assert event["hypervisor"] == {"uri": uris["kvm-b"], "hostname": "kvm-b"}
            assert event["domain"]["uuid"] == domain_b.uuid and event["domain"]["name"] == domain_b.name
            assert event["local"]["service"] == str(domain_b.vnc_port)
            assert event["remote"] == session.remote
    assert {e["hypervisor"]["uri"] for e in on_b} == {uris["kvm-b"]}, "events of A or C without sessions there"
    assert {e["hypervisor"]["hostname"] for e in on_c} == {"kvm-c"}
    assert {e["remote"]["node"] for e in on_c} == {first.client_ip}


@pytest.mark.parametrize("transport", ["tls", "ssh"])
async def test_partitioned_host_is_resynchronised_by_snapshot_after_the_heal(
        fleet: Fleet, clients, transport: str, source_log: SourceLog):
    """B's management network is cut (libvirt's TLS port and SSH dropped on B) while a session
    closes and another opens there; A stays watched; after the heal the snapshot reports both,
    the closed one with an upper bound as its duration."""
    host_b = fleet.hosts["kvm-b"]
    uris = {hostname: fleet.uri(hostname, transport) for hostname in HOSTNAMES}
    leaving_ns, arriving_ns, elsewhere_ns = clients(), clients(), clients()
    try:
        async with SourceRun({"uri": list(uris.values()), **FAST_RECOVERY}) as run:
            for uri in uris.values():
                await source_log.subscribed(uri, run, timeout=60)
            leaving = await open_session(fleet, leaving_ns, "kvm-b")
            [live_initialize] = await run.wait_for(1, remote__node=leaving_ns.client_ip, phase="initialize")

            await asyncio.to_thread(host_b.partition)
            partitioned_from = len(run.events)
            await source_log.wait_for(1, f"{uris['kvm-b']}: connection closed", run=run, timeout=60)
            await close_session(leaving)
            arriving = await open_session(fleet, arriving_ns, "kvm-b")
            # A stays watched meanwhile: its session is reported live.
            await close_session(await open_session(fleet, elsewhere_ns, "kvm-a"))
            on_a = await run.wait_for(3, remote__node=elsewhere_ns.client_ip)
            during_gap = [e for e in run.events[partitioned_from:] if e["hypervisor"]["uri"] == uris["kvm-b"]]
            if transport == "tls":
                # reconnection attempts ask B's libvirt port first and give up on silence, instead
                # of a libvirt connect that would wait out the kernel's SYN retries past the heal
                await source_log.wait_for(2, f"{uris['kvm-b']}: ", "did not answer within", run=run, timeout=WAIT)

            healed = time.monotonic()
            await asyncio.to_thread(host_b.heal)
            await source_log.subscribed(uris["kvm-b"], run, timeout=WAIT)
            resubscribed = time.monotonic() - healed
            [gone] = await run.wait_for(1, remote__node=leaving_ns.client_ip, phase="disconnect", timeout=WAIT)
            [found] = await run.wait_for(1, remote__node=arriving_ns.client_ip, phase="initialize", timeout=WAIT)
            # and B is live again: the arriving session's end comes as a live event
            await close_session(arriving)
            [arriving_end] = await run.wait_for(
                1, remote__node=arriving_ns.client_ip, phase="disconnect", timeout=WAIT)
    finally:
        await asyncio.to_thread(host_b.heal)

    print(f"{transport}: B subscribed again {resubscribed:.1f} s after the heal")
    assert during_gap == [], "events of B arrived while B was partitioned"
    assert {e["hypervisor"]["uri"] for e in on_a} == {uris["kvm-a"]}
    assert [e["phase"] for e in on_a] == ["connect", "initialize", "disconnect"]
    assert gone["snapshot"] is True
    assert gone["session"]["id"] == live_initialize["session"]["id"]
    assert gone["session"]["authenticated"] is True
    assert gone["session"]["duration_exact"] is False  # it ended at some moment of the gap: an upper bound
    assert gone["session"]["duration_s"] >= 0
    assert gone["hypervisor"] == {"uri": uris["kvm-b"], "hostname": "kvm-b"}
    assert gone["remote"] == leaving.remote
    assert found["snapshot"] is True
    assert found["hypervisor"] == {"uri": uris["kvm-b"], "hostname": "kvm-b"}
    assert found["domain"]["uuid"] == fleet.domains["kvm-b"].uuid
    assert found["remote"] == arriving.remote
    assert arriving_end["snapshot"] is False
    assert arriving_end["session"]["id"] == found["session"]["id"]
    assert arriving_end["session"]["duration_exact"] is False  # its start was not seen


@pytest.mark.parametrize("transport", ["tls", "ssh"])
async def test_killed_and_restarted_libvirtd_is_watched_again(fleet: Fleet, clients, transport: str,
                                                              source_log: SourceLog):
    """B's libvirtd is killed (SIGKILL, as a crash) and started again; QEMU and its session live
    on. The source reconnects: the snapshot reports the session that stayed, and sessions after
    the restart are reported live."""
    host_b = fleet.hosts["kvm-b"]
    uris = {hostname: fleet.uri(hostname, transport) for hostname in HOSTNAMES}
    staying_ns, later_ns = clients(), clients()
    try:
        async with SourceRun({"uri": list(uris.values()), **FAST_RECOVERY}) as run:
            for uri in uris.values():
                await source_log.subscribed(uri, run, timeout=60)
            staying = await open_session(fleet, staying_ns, "kvm-b")
            [live_initialize] = await run.wait_for(1, remote__node=staying_ns.client_ip, phase="initialize")

            await asyncio.to_thread(host_b.kill_libvirtd)
            await source_log.wait_for(1, f"{uris['kvm-b']}: connection closed", run=run, timeout=60)
            await asyncio.to_thread(host_b.start_libvirtd)
            assert await asyncio.to_thread(staying.held), "QEMU lost the session with libvirtd"
            await source_log.subscribed(uris["kvm-b"], run, timeout=WAIT)
            snapshots = await run.wait_for(1, remote__node=staying_ns.client_ip, snapshot=True, timeout=WAIT)

            await close_session(await open_session(fleet, later_ns, "kvm-b"))
            after_restart = await run.wait_for(3, remote__node=later_ns.client_ip, timeout=60)
            await close_session(staying)
            [staying_end] = await run.wait_for(1, remote__node=staying_ns.client_ip, phase="disconnect", timeout=60)
    finally:
        if host_b.libvirtd_pid() is None:
            await asyncio.to_thread(host_b.start_libvirtd)

    assert [(e["phase"], e["snapshot"]) for e in snapshots] == [("initialize", True)]
    assert snapshots[0]["session"]["id"] == live_initialize["session"]["id"]
    assert [e["phase"] for e in after_restart] == ["connect", "initialize", "disconnect"]
    for event in after_restart:
        assert event["snapshot"] is False
        assert event["hypervisor"] == {"uri": uris["kvm-b"], "hostname": "kvm-b"}
        assert event["domain"]["uuid"] == fleet.domains["kvm-b"].uuid
    assert after_restart[2]["session"]["duration_exact"] is True
    assert staying_end["snapshot"] is False
    assert staying_end["session"]["id"] == live_initialize["session"]["id"]
    # the source saw this session begin and end, both live, across the restart
    assert staying_end["session"]["duration_exact"] is True
