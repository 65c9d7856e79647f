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

import ipaddress
import os
import socket
import subprocess
import time
from xml.sax.saxutils import escape

import pytest

from lab import rfb
from lab.hypervisor import DOMAIN_XML, PREFIX, Domain, SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, read_jsonl
from lab.server_view import established_peers, nft_blocks, vnc_clients
from lab.tls_console import TlsSaslLab

pytestmark = pytest.mark.slow

BLOCK_SECONDS = 20
STORM_CONSOLES = 5
STORM_PER_CONSOLE = 20  # QEMU serves at most 32 shared clients per display
CUT_TIMEOUT = 120.0  # a deadline for a failing test, not a goal: the bench measures speed
MARKER = f"/tmp/{PREFIX}pw"  # what a rendered hostile certificate name would create
HOSTILE = {
    "hostile": "{{ lookup(*'pipe~touch %s'.split('~')) }}" % MARKER,
    "broken": "{{ broken ~ (",
    "linesep": "line\u2028break\u2029para\u0085next",
}
NFT_TABLE = f"vg_t{os.getpid()}"
ODD_PORT = 45000 + os.getpid() % 10000  # outside 5900-5999, as a fixed port or a websocket may be


def dname(common_name: str) -> str:
    """The certificate DN as libvirt reports it for lab certificates (O then CN)."""
    return f"O=virtguard lab,CN={common_name}"


class Lab:
    """Hypervisors, namespaces and the running activation."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("remediation")
    lab = Lab()
    lab.work = work
    lab.audit = work / "audit.jsonl"
    names = ("trusted", "untrusted", "storm", "snapshot", "hostile", "broken", "alice", "linesep")
    more = ("odd", "v6", "expiry")
    lab.ns = {}
    lab.plain = lab.tls = lab.tls_lab = lab.activation = None
    held = []
    try:
        for index, name in enumerate(names):
            lab.ns[name] = ClientNamespace(index).create()
        for index, name in enumerate(more, start=len(names)):
            lab.ns[name] = ClientNamespace(index).create()
        # dual stack: IPv4 clients arrive as IPv4-mapped IPv6, and IPv6 clients are served
        lab.plain = SessionHypervisor("rp", qemu_conf='vnc_listen = "::"\n').start()
        lab.domains = [lab.plain.create_domain(f"{lab.plain.user}-d{n}", listen="::")
                       for n in range(STORM_CONSOLES)]
        lab.plain_domain = lab.domains[0]
        lab.tls = SessionHypervisor("rt")
        lab.tls_lab = TlsSaslLab(lab.tls.base / "tls", [ns.host_ip for ns in lab.ns.values()])
        lab.tls.qemu_conf = lab.tls_lab.qemu_conf()
        for user in ("alice", "mallory"):
            lab.tls_lab.add_sasl_user(user, f"{user}-pw")
        lab.tls.start()
        lab.tls_domain = lab.tls.create_domain(f"{lab.tls.user}-d0", listen="0.0.0.0")
        lab.clients = {name: lab.tls_lab.client(f"c{index}", cn) for index, (name, cn) in enumerate(HOSTILE.items())}
        lab.clients["alice"] = lab.tls_lab.client("ca", "alice-laptop")
        # A session from an untrusted address that is already open when the activation starts.
        snap = lab.ns["snapshot"]
        lab.snapshot_sock = snap.call(rfb.open_session, snap.host_ip, lab.plain_domain.vnc_port)
        held.append(lab.snapshot_sock)
        trusted = lab.ns["trusted"]
        lab.activation = RulebookRun("unauthorized_console", {
            "virtguard_uri": [lab.plain.uri, lab.tls.uri],
            "virtguard_trusted_networks": [lab.ns[n].network for n in ("trusted", "hostile", "broken", "alice",
                                                                       "linesep")] + [trusted.network6],
            "virtguard_allowed_identities": [dname("alice-laptop"), "alice"],
            "virtguard_block_seconds": BLOCK_SECONDS,
            "virtguard_audit_log": str(lab.audit),
            "virtguard_nft_table": NFT_TABLE,
        }, work).start()
        yield lab
    finally:
        for sock in held:
            sock.close()
        if lab.activation:
            lab.activation.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
        if lab.tls_lab:
            lab.tls_lab.cleanup()
        for hv in (lab.plain, lab.tls):
            if hv:
                hv.stop()
        for ns in lab.ns.values():
            ns.delete()
        if os.path.exists(MARKER):
            os.unlink(MARKER)


# -- helpers --------------------------------------------------------------------------------

def address(text: str):
    return ipaddress.ip_address(text)


def wait_until_gone(lab, clients: set, domains, timeout: float = CUT_TIMEOUT) -> None:
    """Until no (address, port) of ``clients`` is connected on the hypervisor, in the kernel's
    view and in QEMU's."""
    ports = [d.vnc_port for d in domains]

    def gone() -> bool:
        still = established_peers(ports) & clients
        for domain in domains:
            still |= vnc_clients(lab.plain.query_vnc(domain.name)) & clients
        return not still
    wait_for(gone, timeout, f"{len(clients)} console client(s) to be cut on the hypervisor", interval=0.5)


def connected(lab, client: tuple, domain) -> bool:
    return (client in established_peers([domain.vnc_port])
            and client in vnc_clients(lab.plain.query_vnc(domain.name)))


def refused(ns: ClientNamespace, host: str, port: int, source: str | None = None) -> bool:
    def attempt() -> bool:
        try:
            socket.create_connection((host, port), 3, (source, 0) if source else None).close()
        except ConnectionRefusedError:
            return True
        return False
    return ns.call(attempt)


def nft_port_protected(port: int) -> bool:
    return subprocess.run(["nft", "get", "element", "inet", NFT_TABLE, "console_ports", "{", str(port), "}"],
                          capture_output=True, check=False).returncode == 0


def nft_holds(network: str) -> bool:
    return nft_blocks(NFT_TABLE, network)


def remediations(lab, action: str) -> list[dict]:
    return [r for r in read_jsonl(lab.audit) if r["record"] == "remediation" and r["action"] == action]


def cut_connections(lab) -> set:
    """(client address, client port) of every connection a remediation's cut reported."""
    return {(ipaddress.ip_address(c["peer_address"]).ipv4_mapped or address(c["peer_address"]), c["peer_port"])
            for r in remediations(lab, "cut") for c in r["result"].get("cut", [])}


def cut_by_remediation(lab, clients: set, timeout: float = 30) -> bool:
    """Whether every one of ``clients`` is among the connections a remediation reported cut
    (its audit record follows the cut by a moment)."""
    try:
        wait_for(lambda: clients <= cut_connections(lab), timeout, "the cut records", interval=0.3)
    except TimeoutError:
        return False
    return True


def wait_for_remediation(lab, client_address: str, actions=("block", "cut"), timeout: float = 30) -> dict:
    def found():
        records = {r["action"]: r for r in read_jsonl(lab.audit)
                   if r["record"] == "remediation" and client_address in r.get("addresses", [])}
        return records if all(a in records for a in actions) else None
    return wait_for(found, timeout, f"the remediation records of {client_address}", interval=0.3)


def events_of(lab, node: str) -> list[dict]:
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


def open_storm(ns: ClientNamespace, sources: list[str], domains) -> list[tuple]:
    """One held VNC session per source address, spread over the consoles, opened as fast as
    one thread can: (source address, client port, console port) of each."""
    def attempt():
        opened = []
        for index, source in enumerate(sources):
            port = domains[index % len(domains)].vnc_port
            try:
                sock = rfb.open_session(ns.host_ip, port, timeout=10, source=(source, 0))
            except OSError:
                continue  # cut or refused already: its address was remediated
            opened.append((sock, source, port))
        return opened
    return ns.call(attempt)


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


def create_domain_on_port(hv: SessionHypervisor, name: str, port: int):
    """A domain whose VNC listens on a fixed port of our choice, outside libvirt's autoport range."""
    xml = DOMAIN_XML.format(name=escape(name), listen="::").replace(
        "autoport='yes'", f"autoport='no' port='{port}'")
    path = hv.base / f"{name}.xml"
    path.write_text(xml)
    hv.virsh("create", "--paused", str(path))
    return Domain(name=name, uuid=hv.virsh("domuuid", name).stdout.strip(), vnc_port=port)


def test_a_console_port_outside_the_usual_range_after_a_first_cut_is_cut_too(lab):
    odd = lab.ns["odd"]
    first = odd.call(rfb.open_session, odd.host_ip, lab.plain_domain.vnc_port)
    first_client = (address(odd.client_ip), first.getsockname()[1])
    domain = None
    try:
        wait_until_gone(lab, {first_client}, [lab.plain_domain])
        wait_for_remediation(lab, odd.client_ip)
        # a console that did not exist at the first run, on a port no range guessed
        domain = create_domain_on_port(lab.plain, f"{lab.plain.user}-odd", ODD_PORT)
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
        clients = {(address(source), sock.getsockname()[1]) for source, sock in zip(sources, socks)}
        wait_until_gone(lab, clients, [domain])
        assert cut_by_remediation(lab, clients)
        assert nft_holds(ns.client_ip)
        assert nft_holds(str(ipaddress.ip_network(f"{ns.client_ip6}/64", strict=False)))
        assert nft_holds(compat)
        assert not nft_holds("::/64") and not nft_holds("::1"), "the loopback went into the block with the compatible address"
        assert refused(ns, ns.host_ip6, domain.vnc_port, compat)
        assert refused(ns, ns.host_ip6, domain.vnc_port)
    finally:
        for sock in socks:
            sock.close()
        subprocess.run(["ip", "-6", "route", "del", f"{compat}/128"], capture_output=True, check=False)


@pytest.mark.parametrize("client", ["hostile", "broken", "linesep"])
def test_hostile_certificate_name_is_remediated_never_rendered_and_audited_literally(lab, client):
    ns = lab.ns[client]
    port = lab.tls_domain.vnc_port
    # another console connection from the same address, open while the bad session logs in
    held = ns.connect(ns.host_ip, port)
    held_client = (address(ns.client_ip), held.getsockname()[1])
    try:
        rc, output = lab.clients[client].capture(ns.name, ns.host_ip, port - 5900, "mallory", "mallory-pw")
        assert rc == 0, output
        wait_for(lambda: held_client not in established_peers([port]), CUT_TIMEOUT, "the held connection's cut")
    finally:
        held.close()
    records = wait_for_remediation(lab, ns.client_ip)
    assert {a: r["ok"] for a, r in records.items()} == {"block": True, "cut": True}, records
    assert records["block"]["reasons"] == ["identity_not_allowed"]

    initialize = [e for e in events_of(lab, ns.client_ip) if e["graphics"]["phase"] == "initialize"]
    assert initialize[0]["graphics"]["identity"]["x509dname"] == dname(HOSTILE[client])
    assert initialize[0]["graphics"]["identity"]["sasl_username"] == "mallory"
    text = lab.audit.read_text()
    assert all(line.startswith("{") for line in text.splitlines()), "a record was split by a line separator"
    if client != "linesep":
        assert HOSTILE[client] in text  # literally, not escaped away
    assert not os.path.exists(MARKER), "the certificate name was rendered as Jinja"
    assert "failed=1" not in lab.activation.output()
    assert refused(ns, ns.host_ip, port)


def test_allowed_identity_from_a_trusted_network_is_never_touched(lab):
    ns = lab.ns["alice"]
    port = lab.tls_domain.vnc_port
    rc, output = lab.clients["alice"].capture(ns.name, ns.host_ip, port - 5900, "alice", "alice-pw")
    assert rc == 0, output
    events = wait_for(lambda: (lambda found: found if len(found) >= 3 else None)(events_of(lab, ns.client_ip)),
                      20, "alice's three events")
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

    def ours() -> list[dict] | None:
        found = [e for e in events_of(lab, node) if e["graphics"]["remote"]["service"] in ports]
        return found if len(found) >= 9 else None
    events = wait_for(ours, 30, "three sessions' events")
    by_session: dict[str, list[str]] = {}
    for e in events:
        by_session.setdefault(e["graphics"]["session"]["id"], []).append(e["graphics"]["phase"])
    assert sorted(by_session.values()) == [["connect", "initialize", "disconnect"]] * 3
    times = [e["time"] for e in read_jsonl(lab.audit) if e["record"] == "event"]
    assert times == sorted(times)  # appended only
