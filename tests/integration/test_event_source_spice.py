"""The event source against real SPICE consoles and real SPICE clients (spicy-screenshot, a held
spicy): one client is one session, whatever its channels, also when another client from the
same address replaces it (QEMU serves one SPICE client per console); QEMU's own view
(query-spice) is the reference for which channel is the client's main one."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from lab.hypervisor import Domain, SessionHypervisor
from lab.source_log import SourceLog
from lab.source_runner import SourceRun
from lab.spice_clients import MAIN_CHANNEL, HeldSpicy, spice_screenshot, wait_for_channels
from lab.tls_console import TlsSaslLab

pytestmark = pytest.mark.slow

LIVE_ONLY = {"snapshot": False}
PASSWORD = "right-pw"
BURST_DOMAINS = 4
BURST_ROUNDS = 3


class SpiceLab:
    def __init__(self, hv: SessionHypervisor, tls: TlsSaslLab, domains: dict[str, Domain]) -> None:
        self.hv = hv
        self.tls = tls
        self.domains = domains


@pytest.fixture(scope="module")
def spice() -> Iterator[SpiceLab]:
    """A session daemon whose SPICE consoles listen on 127.0.0.1, plain and TLS (the lab CA)."""
    hv = SessionHypervisor("sp")
    tls = TlsSaslLab(hv.base / "tls", ["127.0.0.1"])
    hv.qemu_conf = (f'spice_listen = "127.0.0.1"\nspice_tls = 1\nspice_tls_x509_cert_dir = "{tls.pki}"\n')
    try:
        hv.start()
        names = ["plain", "tls", "held", "snapshot", "password", "replaced", "shared"] + [
            f"burst{n}" for n in range(BURST_DOMAINS)]
        domains = {name: hv.create_domain(f"{hv.user}-{name}", graphics="spice",
                                          password=PASSWORD if name == "password" else None)
                   for name in names}
        yield SpiceLab(hv, tls, domains)
    finally:
        hv.stop()
        tls.cleanup()


@pytest.fixture(scope="module")
def spice_sasl() -> Iterator[SpiceLab]:
    """A session daemon whose SPICE consoles require SASL (SCRAM-SHA-256, over TLS)."""
    hv = SessionHypervisor("ss")
    tls = TlsSaslLab(hv.base / "tls", ["127.0.0.1"])
    hv.qemu_conf = (f'spice_listen = "127.0.0.1"\nspice_tls = 1\nspice_tls_x509_cert_dir = "{tls.pki}"\n'
                    f'spice_sasl = 1\nspice_sasl_dir = "{tls.sasl}"\n')
    try:
        tls.add_sasl_user("alice", "alice-pw")
        hv.start()
        yield SpiceLab(hv, tls, {"sasl": hv.create_domain(f"{hv.user}-sasl", graphics="spice")})
    finally:
        hv.stop()
        tls.cleanup()


def by_session(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    sessions: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for event in events:
        sessions[event["session"]["id"]].append(event)
    return sessions


def primaries(events: list[dict[str, Any]]) -> list[str]:
    return [e["phase"] for e in events if e["session"]["primary"]]


async def screenshot(domain: Domain, **kwargs: Any) -> tuple[int, str]:
    return await asyncio.to_thread(spice_screenshot, "127.0.0.1", **kwargs)


async def whole_client(run: SourceRun, domain: Domain, channels_events: int, **kwargs: Any) -> list[dict[str, Any]]:
    """One spicy-screenshot on ``domain``, and the events of it, once its last channel left."""
    status, output = await screenshot(domain, **kwargs)
    assert status == 0, output
    await run.wait_for(channels_events, domain__name=domain.name)
    await run.wait_for(1, domain__name=domain.name, phase="disconnect", session__channels=0)
    return run.matching(domain__name=domain.name)


def check_one_client(events: list[dict[str, Any]], channels: int) -> None:
    """The events of one client with ``channels`` channels: one session, one primary connect,
    initialize and disconnect, the channel count going up and back to 0."""
    assert {e["protocol"] for e in events} == {"spice"}
    assert len(by_session(events)) == 1, by_session(events).keys()
    assert primaries(events) == ["connect", "initialize", "disconnect"]
    assert events[0]["phase"] == "connect" and events[0]["session"]["primary"] is True
    assert [e["phase"] for e in events].count("connect") == channels
    assert max(e["session"]["channels"] for e in events) == channels
    assert events[-1]["phase"] == "disconnect" and events[-1]["session"]["channels"] == 0
    [end] = [e for e in events if e["phase"] == "disconnect" and e["session"]["primary"]]
    span = (events[-1]["timestamp"], events[0]["timestamp"])
    assert end["session"]["duration_exact"] is True and end["session"]["duration_s"] > 0, span
    assert all("duration_s" not in e["session"] for e in events if e is not end)


async def test_spicy_screenshot_is_one_session_whose_primary_is_its_main_channel(spice, source_log: SourceLog):
    domain = spice.domains["plain"]
    async with SourceRun({"uri": spice.hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(spice.hv.uri, run)
        events = await whole_client(run, domain, 6, port=domain.vnc_port)
    check_one_client(events, channels=2)
    assert {e["local"]["service"] for e in events} == {str(domain.vnc_port)}
    # QEMU names no auth scheme on SPICE's connect and disconnect, and SPICE's on initialize
    assert {e["auth_scheme"] for e in events if e["phase"] != "initialize"} == {""}
    assert {e["auth_scheme"] for e in events if e["phase"] == "initialize"} == {"none"}
    assert all(e["subject"] == [] and e["identity"] == {} for e in events)
    assert [e["session"]["authenticated"] for e in events if e["session"]["primary"]] == [False, True, True]


async def test_a_spice_client_over_tls_is_one_session_on_the_tls_port(spice, source_log: SourceLog):
    domain = spice.domains["tls"]
    assert domain.tls_port is not None
    async with SourceRun({"uri": spice.hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(spice.hv.uri, run)
        events = await whole_client(run, domain, 6, tls_port=domain.tls_port, ca_pem=spice.tls.ca_pem)
    check_one_client(events, channels=2)
    assert {e["local"]["service"] for e in events} == {str(domain.tls_port)}


async def test_a_held_spicy_is_one_session_of_four_channels_with_qemus_main_channel_as_primary(
        spice, source_log: SourceLog):
    domain = spice.domains["held"]
    async with SourceRun({"uri": spice.hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(spice.hv.uri, run)
        with HeldSpicy("127.0.0.1", port=domain.vnc_port):
            channels = await asyncio.to_thread(wait_for_channels, spice.hv.virsh, domain.name, 4)
            await run.wait_for(8, domain__name=domain.name)  # connect + initialize per channel
            [main] = [c for c in channels if c["channel-type"] == MAIN_CHANNEL]
            assert len({c["connection-id"] for c in channels}) == 1
            opened = run.matching(domain__name=domain.name)
        await run.wait_for(1, domain__name=domain.name, phase="disconnect", session__channels=0)
        events = run.matching(domain__name=domain.name)
    check_one_client(events, channels=4)
    assert {e["remote"]["service"] for e in events if e["session"]["primary"]} == {main["port"]}
    assert {e["remote"]["service"] for e in events} == {c["port"] for c in channels}
    assert [e["session"]["channels"] for e in opened if e["phase"] == "connect"] == [1, 2, 3, 4]


async def test_a_connected_spice_client_is_one_snapshot_session_with_its_channels(spice):
    domain = spice.domains["snapshot"]
    with HeldSpicy("127.0.0.1", port=domain.vnc_port) as held:
        channels = await asyncio.to_thread(wait_for_channels, spice.hv.virsh, domain.name, 4)
        [main] = [c for c in channels if c["channel-type"] == MAIN_CHANNEL]
        async with SourceRun({"uri": spice.hv.uri}) as run:
            [snap] = await run.wait_for(1, domain__name=domain.name)
            assert snap["snapshot"] is True and snap["phase"] == "initialize" and snap["protocol"] == "spice"
            assert snap["session"] == {"id": snap["session"]["id"], "authenticated": True, "primary": True,
                                       "channels": 4}
            assert snap["remote"]["service"] == main["port"]
            assert snap["local"]["service"] == str(domain.vnc_port)
            held.close()
            await run.wait_for(5, domain__name=domain.name)
            await run.wait_for(1, domain__name=domain.name, phase="disconnect", session__channels=0)
            live = run.matching(domain__name=domain.name, snapshot=False)
    assert len(run.matching(domain__name=domain.name, snapshot=True)) == 1
    assert {e["session"]["id"] for e in live} == {snap["session"]["id"]}
    assert [e["phase"] for e in live] == ["disconnect"] * 4
    assert primaries(live) == ["disconnect"]
    [end] = [e for e in live if e["session"]["primary"]]
    assert end["remote"]["service"] == main["port"] and end["session"]["duration_exact"] is False


async def test_a_wrong_spice_password_is_a_main_channel_that_never_initializes(spice, source_log: SourceLog):
    domain = spice.domains["password"]
    async with SourceRun({"uri": spice.hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(spice.hv.uri, run)
        status, output = await screenshot(domain, port=domain.vnc_port, password="wrong-pw")
        assert status != 0, output
        failed = await run.wait_for(2, domain__name=domain.name)
        await whole_client(run, domain, 2 + 6, port=domain.vnc_port, password=PASSWORD)
        events = run.matching(domain__name=domain.name)
    assert [(e["phase"], e["session"]["primary"]) for e in failed] == [("connect", True), ("disconnect", True)]
    assert failed[1]["session"]["authenticated"] is False and failed[1]["session"]["channels"] == 0
    sessions = by_session(events)
    assert len(sessions) == 2
    good = sessions[next(sid for sid in sessions if sid != failed[0]["session"]["id"])]
    check_one_client(good, channels=2)
    assert [e["auth_scheme"] for e in good if e["phase"] == "initialize"] == ["spice", "spice"]


async def test_a_burst_of_spice_clients_loses_no_session_and_merges_none(spice, source_log: SourceLog):
    """Clients on several consoles at once, one after another on each (QEMU serves one SPICE
    client at a time per console): every client is one whole session, none is lost or merged."""
    domains = [spice.domains[f"burst{n}"] for n in range(BURST_DOMAINS)]

    async def rounds(domain: Domain) -> None:
        for _round in range(BURST_ROUNDS):
            status, output = await screenshot(domain, port=domain.vnc_port)
            assert status == 0, output

    async with SourceRun({"uri": spice.hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(spice.hv.uri, run)
        await asyncio.gather(*(rounds(domain) for domain in domains))
        for domain in domains:
            await run.wait_for(BURST_ROUNDS, domain__name=domain.name, phase="disconnect", session__channels=0)
        events = {domain.name: run.matching(domain__name=domain.name) for domain in domains}
    for domain in domains:
        sessions = by_session(events[domain.name])
        assert len(sessions) == BURST_ROUNDS, domain.name
        for client in sessions.values():
            check_one_client(client, channels=2)


async def test_a_sasl_login_is_one_session_and_a_failed_one_a_main_channel_that_never_initializes(
        spice_sasl, source_log: SourceLog):
    """SPICE with SASL: libvirt passes no identity for it (no saslUsername), and QEMU 7.2 names
    no SASL scheme either (its SPICE events know only the ticket: ``none`` or ``spice``)."""
    domain = spice_sasl.domains["sasl"]
    login = {"tls_port": domain.tls_port, "ca_pem": spice_sasl.tls.ca_pem, "username": "alice"}
    async with SourceRun({"uri": spice_sasl.hv.uri, **LIVE_ONLY}) as run:
        await source_log.subscribed(spice_sasl.hv.uri, run)
        status, output = await screenshot(domain, password="wrong-pw", **login)
        assert status != 0, output
        failed = await run.wait_for(2, domain__name=domain.name)
        events = await whole_client(run, domain, 2 + 6, password="alice-pw", **login)
    assert [(e["phase"], e["session"]["primary"], e["session"]["authenticated"]) for e in failed] == [
        ("connect", True, False), ("disconnect", True, False)]
    good = [e for e in events if e["session"]["id"] != failed[0]["session"]["id"]]
    check_one_client(good, channels=2)
    assert {e["local"]["service"] for e in good} == {str(domain.tls_port)}
    assert {e["auth_scheme"] for e in good if e["phase"] == "initialize"} == {"none"}
    assert all(e["subject"] == [] and e["identity"] == {} for e in events)


@contextlib.asynccontextmanager
async def held_client(spice: SpiceLab, run: SourceRun, domain: Domain) -> AsyncIterator[list[dict[str, Any]]]:
    """A held spicy on ``domain``, once QEMU lists its 4 channels and the source reported them."""
    with HeldSpicy("127.0.0.1", port=domain.vnc_port):
        channels = await asyncio.to_thread(wait_for_channels, spice.hv.virsh, domain.name, 4)
        await run.wait_for(8, domain__name=domain.name)
        yield channels


def two_clients(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The events of exactly two sessions, the first to begin first."""
    sessions = by_session(events)
    assert len(sessions) == 2, {sid: [(e["phase"], e["remote"]["service"]) for e in ev] for sid, ev in sessions.items()}
    first, second = sorted(sessions.values(), key=lambda ev: ev[0]["timestamp"])
    return first, second


async def test_a_client_that_replaces_another_from_the_same_address_is_a_session_of_its_own(
        spice, source_log: SourceLog):
    """A held spicy (4 channels), then a spicy-screenshot from the same address: QEMU drops the
    first client for the second. Two sessions, each with its own primary connect, initialize
    and disconnect: the second gets a verdict and an audit line of its own."""
    domain = spice.domains["replaced"]
    async with SourceRun({"uri": spice.hv.uri}) as run:
        await source_log.subscribed(spice.hv.uri, run)
        async with held_client(spice, run, domain) as held:
            status, output = await screenshot(domain, port=domain.vnc_port)
            assert status == 0, output
            # both clients gone: 4 + 2 channels, each connected, initialized and disconnected
            await run.wait_for(2, domain__name=domain.name, phase="disconnect", session__channels=0, timeout=60)
            await asyncio.to_thread(wait_for_channels, spice.hv.virsh, domain.name, 0)
        events = run.matching(domain__name=domain.name, snapshot=False)
    first, second = two_clients(events)
    assert {e["remote"]["service"] for e in first} == {c["port"] for c in held}
    check_one_client(first, channels=4)
    check_one_client(second, channels=2)


async def test_two_held_clients_behind_one_address_are_two_sessions(spice, source_log: SourceLog):
    """Two spicy clients from one address (as behind a NAT), the second replacing the first:
    each is one whole session of its four channels."""
    domain = spice.domains["shared"]
    async with SourceRun({"uri": spice.hv.uri}) as run:
        await source_log.subscribed(spice.hv.uri, run)
        async with held_client(spice, run, domain) as first:
            with HeldSpicy("127.0.0.1", port=domain.vnc_port):
                await run.wait_for(1, domain__name=domain.name, phase="disconnect", session__channels=0, timeout=60)

                def second_client() -> list[dict[str, Any]]:
                    channels = wait_for_channels(spice.hv.virsh, domain.name, 4)
                    assert not {c["port"] for c in channels} & {c["port"] for c in first}
                    return channels
                second = await asyncio.to_thread(second_client)
                await run.wait_for(8 + 4 + 8, domain__name=domain.name)
            await run.wait_for(2, domain__name=domain.name, phase="disconnect", session__channels=0, timeout=60)
        events = run.matching(domain__name=domain.name, snapshot=False)
    one, two = two_clients(events)
    assert {e["remote"]["service"] for e in one} == {c["port"] for c in first}
    assert {e["remote"]["service"] for e in two} == {c["port"] for c in second}
    check_one_client(one, channels=4)
    check_one_client(two, channels=4)
