"""The unauthorized_console rulebook end to end, as an attacker would try it: real
ansible-rulebook running the shipped rulebook against real libvirt session daemons (one plain
dual-stack VNC with several consoles, one VNC with TLS + SASL), clients in their own network
namespaces, real nftables and ``ss -K`` on this host (the lab's hypervisor).

Every outcome is judged where it happens: the hypervisor's established connections (``ss``)
and QEMU's own client list (``query-vnc``), never what a client socket reads.

One activation serves the whole module (the JVM start costs seconds); each scenario uses client
addresses of its own, because a remediation blocks a network for a while, and sets up what it
needs itself, so any test passes alone.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab import rfb
from lab.hypervisor import PREFIX, Domain, SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl
from lab.server_view import established_peers, nft_blocks, vnc_clients
from lab.tls_console import ConsoleClient, TlsSaslLab

pytestmark = pytest.mark.slow

BLOCK_SECONDS = 20
STORM_CONSOLES = 5
STORM_PER_CONSOLE = 20  # QEMU serves at most 32 shared clients per display
CUT_TIMEOUT = 120.0  # a deadline for a failing test, not a goal: the bench measures speed
MARKER = f"/tmp/{PREFIX}pw"  # what a rendered hostile certificate name would create
HOSTILE = {
    "hostile": f"{{{{ lookup(*'pipe~touch {MARKER}'.split('~')) }}}}",
    "broken": "{{ broken ~ (",
    "linesep": "line\u2028break\u2029para\u0085next",
}
NFT_TABLE = f"vg_t{os.getpid()}"
ODD_PORT = 45000 + os.getpid() % 10000  # outside 5900-5999, as a fixed port or a websocket may be


def dname(common_name: str) -> str:
    """The certificate DN as libvirt reports it for lab certificates (O then CN)."""
    return f"O=virtguard lab,CN={common_name}"


@dataclasses.dataclass
class Lab:
    """Hypervisors, namespaces and the running activation."""

    work: Path
    audit: Path
    ns: dict[str, ClientNamespace]
    plain: SessionHypervisor
    domains: list[Domain]
    plain_domain: Domain
    tls: SessionHypervisor
    tls_lab: TlsSaslLab
    tls_domain: Domain
    clients: dict[str, ConsoleClient]
    snapshot_sock: socket.socket
    activation: RulebookRun


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("remediation")
    audit = work / "audit.jsonl"
    names = ("trusted", "untrusted", "storm", "snapshot", "hostile", "broken", "alice", "linesep")
    more = ("odd", "v6", "expiry")
    namespaces: dict[str, ClientNamespace] = {}
    plain: SessionHypervisor | None = None
    tls: SessionHypervisor | None = None
    tls_lab: TlsSaslLab | None = None
    activation: RulebookRun | None = None
    held = []
    try:
        for index, name in enumerate(names):
            namespaces[name] = ClientNamespace(index).create()
        for index, name in enumerate(more, start=len(names)):
            namespaces[name] = ClientNamespace(index).create()
        # dual stack: IPv4 clients arrive as IPv4-mapped IPv6, and IPv6 clients are served
        plain = SessionHypervisor("rp", qemu_conf='vnc_listen = "::"\n').start()
        domains = [plain.create_domain(f"{plain.user}-d{n}", listen="::") for n in range(STORM_CONSOLES)]
        tls = SessionHypervisor("rt")
        tls_lab = TlsSaslLab(tls.base / "tls", [ns.host_ip for ns in namespaces.values()])
        tls.qemu_conf = tls_lab.qemu_conf()
        for user in ("alice", "mallory"):
            tls_lab.add_sasl_user(user, f"{user}-pw")
        tls.start()
        tls_domain = tls.create_domain(f"{tls.user}-d0", listen="0.0.0.0")
        clients = {name: tls_lab.client(f"c{index}", cn) for index, (name, cn) in enumerate(HOSTILE.items())}
        clients["alice"] = tls_lab.client("ca", "alice-laptop")
        # A session from an untrusted address that is already open when the activation starts.
        snap = namespaces["snapshot"]
        snapshot_sock = snap.call(rfb.open_session, snap.host_ip, domains[0].vnc_port)
        held.append(snapshot_sock)
        trusted = namespaces["trusted"]
        activation = RulebookRun("unauthorized_console", {
            "virtguard_uri": [plain.uri, tls.uri],
            "virtguard_trusted_networks": [namespaces[n].network for n in ("trusted", "hostile", "broken", "alice",
                                                                           "linesep")] + [trusted.network6],
            "virtguard_allowed_identities": [dname("alice-laptop"), "alice"],
            "virtguard_block_seconds": BLOCK_SECONDS,
            "virtguard_audit_log": str(audit),
            "virtguard_nft_table": NFT_TABLE,
        }, work).start()
        yield Lab(work=work, audit=audit, ns=namespaces, plain=plain, domains=domains, plain_domain=domains[0],
                  tls=tls, tls_lab=tls_lab, tls_domain=tls_domain, clients=clients, snapshot_sock=snapshot_sock,
                  activation=activation)
    finally:
        for sock in held:
            sock.close()
        if activation is not None:
            activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
        if tls_lab is not None:
            tls_lab.cleanup()
        for hv in (plain, tls):
            if hv is not None:
                hv.stop()
        for ns in namespaces.values():
            ns.delete()
        if os.path.exists(MARKER):
            os.unlink(MARKER)


# -- helpers --------------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Client = tuple[IPAddress, int]  # (client address, client port) as the hypervisor sees it


def address(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def peer_address(text: str) -> IPAddress:
    """A peer address as a hypervisor socket shows it: an IPv4-mapped one is its IPv4 address."""
    value = address(text)
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return value.ipv4_mapped
    return value


def wait_until_gone(lab: Lab, clients: set[Client], domains: list[Domain], timeout: float = CUT_TIMEOUT) -> None:
    """Until no (address, port) of ``clients`` is connected on the hypervisor, in the kernel's
    view and in QEMU's."""
    ports = [d.vnc_port for d in domains]

    def gone() -> bool:
        still = established_peers(ports) & clients
        for domain in domains:
            still |= vnc_clients(lab.plain.query_vnc(domain.name)) & clients
        return not still
    wait_for(gone, timeout, f"{len(clients)} console client(s) to be cut on the hypervisor", interval=0.5)


def connected(lab: Lab, client: Client, domain: Domain) -> bool:
    return bool(client in established_peers([domain.vnc_port])
                and client in vnc_clients(lab.plain.query_vnc(domain.name)))


def refused(ns: ClientNamespace, host: str, port: int, source: str | None = None) -> bool:
    def attempt() -> bool:
        try:
            socket.create_connection((host, port), 3, (source, 0) if source else None).close()
        except ConnectionRefusedError:
            return True
        return False
    return bool(ns.call(attempt))


def nft_port_protected(port: int) -> bool:
    return subprocess.run(["nft", "get", "element", "inet", NFT_TABLE, "console_ports", "{", str(port), "}"],
                          capture_output=True, check=False).returncode == 0


def nft_holds(network: str) -> bool:
    return nft_blocks(NFT_TABLE, network)


def remediations(lab: Lab, action: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(lab.audit) if r["record"] == "remediation" and r["action"] == action]


def cut_connections(lab: Lab) -> set[Client]:
    """(client address, client port) of every connection a remediation's cut reported."""
    return {(peer_address(c["peer_address"]), c["peer_port"])
            for r in remediations(lab, "cut") for c in r["result"].get("cut", [])}


def cut_by_remediation(lab: Lab, clients: set[Client], timeout: float = 30) -> bool:
    """Whether every one of ``clients`` is among the connections a remediation reported cut
    (its audit record follows the cut by a moment)."""
    try:
        wait_for(lambda: clients <= cut_connections(lab), timeout, "the cut records", interval=0.3)
    except TimeoutError:
        return False
    return True


def wait_for_remediation(lab: Lab, client_address: str, actions: tuple[str, ...] = ("block", "cut"),
                         timeout: float = 30) -> dict[str, dict[str, Any]]:
    def found() -> dict[str, dict[str, Any]] | None:
        records = {r["action"]: r for r in read_jsonl(lab.audit)
                   if r["record"] == "remediation" and client_address in r.get("addresses", [])}
        return records if all(a in records for a in actions) else None
    records: dict[str, dict[str, Any]] = wait_for(found, timeout, f"the remediation records of {client_address}",
                                                  interval=0.3)
    return records


def events_of(lab: Lab, node: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(lab.audit) if r["record"] == "event" and r["graphics"]["remote"]["node"] == node]


def mapped(ipv4: str) -> str:
    return f"::ffff:{ipv4}"


# -- scenarios ------------------------------------------------------------------------------

def test_untrusted_session_is_cut_and_refused_while_trusted_survives(lab):
    domain = lab.plain_domain
    trusted, untrusted = lab.ns["trusted"], lab.ns["untrusted"]
    trusted_sock = trusted.call(rfb.open_session, trusted.host_ip, domain.vnc_port)
    sock = untrusted.call(rfb.open_session, untrusted.host_ip, domain.vnc_port)
    try:
        victim = (address(untrusted.client_ip), sock.getsockname()[1])
        bystander = (address(trusted.client_ip), trusted_sock.getsockname()[1])
        wait_until_gone(lab, {victim}, [domain])
        records = wait_for_remediation(lab, untrusted.client_ip)
        assert records["block"]["ok"] and records["cut"]["ok"], records
        assert records["block"]["reasons"] == ["untrusted_network"]
        assert records["block"]["result"]["blocked"][0]["timeout"] == BLOCK_SECONDS
        assert cut_by_remediation(lab, {victim})
        assert nft_holds(untrusted.client_ip)
        assert refused(untrusted, untrusted.host_ip, domain.vnc_port), "a blocked address could reconnect"
        assert connected(lab, bystander, domain), "the trusted session was cut"
        trusted_events = events_of(lab, mapped(trusted.client_ip))
        assert trusted_events and all(e["virtguard"]["verdict"] == "allow" for e in trusted_events)
        assert not [r for r in read_jsonl(lab.audit)
                    if r["record"] == "remediation" and trusted.client_ip in r.get("addresses", [])]
    finally:
        sock.close()
        trusted_sock.close()


def test_session_open_before_the_activation_is_cut(lab):
    snap = lab.ns["snapshot"]
    client = (address(snap.client_ip), lab.snapshot_sock.getsockname()[1])
    wait_until_gone(lab, {client}, [lab.plain_domain])
    events = [e for e in events_of(lab, mapped(snap.client_ip)) if e["graphics"]["snapshot"]]
    assert events and events[0]["virtguard"]["reasons"] == ["untrusted_network"]
    assert cut_by_remediation(lab, {client})
    assert refused(snap, snap.host_ip, lab.plain_domain.vnc_port)


def open_storm(ns: ClientNamespace, sources: list[str], domains: list[Domain]) -> list[tuple[socket.socket, str, int]]:
    """One held VNC session per source address, spread over the consoles, opened as fast as
    one thread can: (socket, source address, console port) of each."""
    def attempt() -> list[tuple[socket.socket, str, int]]:
        opened = []
        for index, source in enumerate(sources):
            port = domains[index % len(domains)].vnc_port
            try:
                sock = rfb.open_session(ns.host_ip, port, timeout=10, source=(source, 0))
            except OSError:
                continue  # cut or refused already: its address was remediated
            opened.append((sock, source, port))
        return opened
    opened: list[tuple[socket.socket, str, int]] = ns.call(attempt)
    return opened


def test_a_distributed_storm_is_cut_session_by_session_in_batches(lab):
    """100 untrusted addresses, one held session each, 20 per console over 5 consoles: every
    session is cut by a remediation, in far fewer runs than addresses, and every address blocked."""
    storm = lab.ns["storm"]
    base = storm.client_ip.rsplit(".", 1)[0]
    sources = [f"{base}.{10 + n}" for n in range(STORM_CONSOLES * STORM_PER_CONSOLE)]
    for source in sources:
        storm.run(["ip", "addr", "add", f"{source}/24", "dev", storm.ns_link])
    opened = open_storm(storm, sources, lab.domains)
    try:
        sessions = {(address(source), sock.getsockname()[1]) for sock, source, _port in opened}
        assert len(sessions) >= len(sources) * 0.9, "the storm could not open its sessions"
        wait_until_gone(lab, sessions, lab.domains)
        assert cut_by_remediation(lab, sessions), "a session ended otherwise than by a remediation's cut"
        runs = [r for r in remediations(lab, "block") if set(r["addresses"]) & set(sources)]
        assert len(runs) < len(sources) / 4, f"{len(runs)} runs for {len(sources)} addresses: not batched"
        blocked = {a for r in runs for a in r["addresses"]}
        assert blocked == set(sources)
        assert all(nft_holds(source) for source in sources)
    finally:
        for sock, _source, _port in opened:
            sock.close()


def test_a_console_port_outside_the_usual_range_after_a_first_cut_is_cut_too(lab):
    odd = lab.ns["odd"]
    first = odd.call(rfb.open_session, odd.host_ip, lab.plain_domain.vnc_port)
    first_client = (address(odd.client_ip), first.getsockname()[1])
    domain = None
    try:
        wait_until_gone(lab, {first_client}, [lab.plain_domain])
        wait_for_remediation(lab, odd.client_ip)
        # a console that did not exist at the first run, on a port no range guessed
        domain = lab.plain.create_domain(f"{lab.plain.user}-odd", listen="::", port=ODD_PORT)
        try:
            sock = odd.call(rfb.open_session, odd.host_ip, ODD_PORT)
        except ConnectionRefusedError:
            # another host's run found the new console since and blocks it already: the other
            # good outcome, judged in nftables
            assert nft_port_protected(ODD_PORT)
            return
        second = (address(odd.client_ip), sock.getsockname()[1])
        try:
            wait_until_gone(lab, {second}, [domain])
            assert cut_by_remediation(lab, {second})
            assert nft_port_protected(ODD_PORT)
            assert refused(odd, odd.host_ip, ODD_PORT)
        finally:
            sock.close()
    finally:
        first.close()
        if domain is not None:
            lab.plain.destroy_domain(domain.name)


def test_ipv6_ipv4_mapped_and_ipv4_compatible_clients_are_cut_and_blocked(lab):
    ns = lab.ns["v6"]
    domain = lab.plain_domain
    compat = "::" + ns.client_ip.rsplit(".", 1)[0] + ".9"
    ns.run(["ip", "-6", "addr", "add", f"{compat}/128", "dev", ns.ns_link, "nodad"])
    subprocess.run(["ip", "-6", "route", "replace", f"{compat}/128", "dev", ns.host_link], check=True)
    socks = []
    try:
        socks.append(ns.call(rfb.open_session, ns.host_ip, domain.vnc_port))  # IPv4-mapped on the server
        socks.append(ns.call(rfb.open_session, ns.host_ip6, domain.vnc_port))  # native IPv6
        socks.append(ns.call(rfb.open_session, ns.host_ip6, domain.vnc_port, 10, (compat, 0)))  # IPv4-compatible
        sources = (ns.client_ip, ns.client_ip6, compat)
        clients = {(address(source), sock.getsockname()[1]) for source, sock in zip(sources, socks, strict=True)}
        wait_until_gone(lab, clients, [domain])
        assert cut_by_remediation(lab, clients)
        assert nft_holds(ns.client_ip)
        assert nft_holds(str(ipaddress.ip_network(f"{ns.client_ip6}/64", strict=False)))
        assert nft_holds(compat)
        assert not nft_holds("::/64") and not nft_holds("::1"), \
            "the loopback went into the block with the compatible address"
        assert refused(ns, ns.host_ip6, domain.vnc_port, compat)
        assert refused(ns, ns.host_ip6, domain.vnc_port)
    finally:
        for sock in socks:
            sock.close()
        subprocess.run(["ip", "-6", "route", "del", f"{compat}/128"], capture_output=True, check=False)


@pytest.mark.parametrize("client", ["hostile", "broken", "linesep"])
def test_hostile_certificate_name_is_remediated_never_rendered_and_audited_literally(lab, client):
    """The hostile names come from trusted networks: the session that fails the identity policy
    is cut alone (its exact connection), never its address, which stays unblocked with its other
    connections (a trusted address is never blocked nor cut for its address)."""
    ns = lab.ns[client]
    port = lab.tls_domain.vnc_port
    # another console connection from the same address, open while the bad session logs in
    held = ns.connect(ns.host_ip, port)
    held_client = (address(ns.client_ip), held.getsockname()[1])
    try:
        rc, output = lab.clients[client].capture(ns.name, ns.host_ip, port - 5900, "mallory", "mallory-pw")
        assert rc == 0, output
        records = wait_for_remediation(lab, ns.client_ip, timeout=CUT_TIMEOUT)
        assert held_client in established_peers([port]), "a connection of the trusted address was cut"
    finally:
        held.close()
    assert {a: r["ok"] for a, r in records.items()} == {"block": True, "cut": True}, records
    assert records["block"]["reasons"] == ["identity_not_allowed"]
    assert records["block"]["networks"] == [] and records["block"]["result"]["blocked"] == []

    initialize = [e for e in events_of(lab, ns.client_ip) if e["graphics"]["phase"] == "initialize"]
    assert initialize[0]["graphics"]["identity"]["x509dname"] == dname(HOSTILE[client])
    assert initialize[0]["graphics"]["identity"]["sasl_username"] == "mallory"
    assert initialize[0]["virtguard"]["session_id"] in records["cut"]["sessions"]
    text = lab.audit.read_text()
    assert all(line.startswith("{") for line in text.splitlines()), "a record was split by a line separator"
    if client != "linesep":
        assert HOSTILE[client] in text  # literally, not escaped away
    assert not os.path.exists(MARKER), "the certificate name was rendered as Jinja"
    assert "failed=1" not in lab.activation.output()
    assert not refused(ns, ns.host_ip, port), "a trusted address was blocked"


def test_allowed_identity_from_a_trusted_network_is_never_touched(lab):
    ns = lab.ns["alice"]
    port = lab.tls_domain.vnc_port
    rc, output = lab.clients["alice"].capture(ns.name, ns.host_ip, port - 5900, "alice", "alice-pw")
    assert rc == 0, output

    def three_events() -> list[dict[str, Any]] | None:
        found = events_of(lab, ns.client_ip)
        return found if len(found) >= 3 else None
    events = wait_for(three_events, 20, "alice's three events")
    assert [e["graphics"]["phase"] for e in events] == ["connect", "initialize", "disconnect"]
    assert all(e["virtguard"]["verdict"] == "allow" and not e["virtguard"]["queued"] for e in events)
    rc, output = lab.clients["alice"].capture(ns.name, ns.host_ip, port - 5900, "alice", "alice-pw")
    assert rc == 0, output  # not blocked
    assert not [r for r in read_jsonl(lab.audit)
                if r["record"] == "remediation" and ns.client_ip in r.get("addresses", [])]


def test_block_expires_by_itself(lab):
    ns = lab.ns["expiry"]
    port = lab.plain_domain.vnc_port
    sock = ns.call(rfb.open_session, ns.host_ip, port)
    try:
        wait_until_gone(lab, {(address(ns.client_ip), sock.getsockname()[1])}, [lab.plain_domain])
    finally:
        sock.close()
    wait_for_remediation(lab, ns.client_ip)
    assert nft_holds(ns.client_ip)
    wait_for(lambda: not nft_holds(ns.client_ip), BLOCK_SECONDS + 15, "the block to expire")
    assert not refused(ns, ns.host_ip, port)


def test_every_event_of_a_session_is_on_record_in_order(lab):
    ns = lab.ns["trusted"]
    ports = set()
    for _session in range(3):
        sock = ns.call(rfb.open_session, ns.host_ip, lab.plain_domain.vnc_port)
        ports.add(str(sock.getsockname()[1]))
        sock.close()
    node = mapped(ns.client_ip)

    def ours() -> list[dict[str, Any]] | None:
        found = [e for e in events_of(lab, node) if e["graphics"]["remote"]["service"] in ports]
        return found if len(found) >= 9 else None
    events = wait_for(ours, 30, "three sessions' events")
    by_session: dict[str, list[str]] = {}
    for e in events:
        by_session.setdefault(e["graphics"]["session"]["id"], []).append(e["graphics"]["phase"])
    assert sorted(by_session.values()) == [["connect", "initialize", "disconnect"]] * 3
    times = [e["time"] for e in read_jsonl(lab.audit) if e["record"] == "event"]
    assert times == sorted(times)  # appended only
