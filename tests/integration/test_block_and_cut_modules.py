"""console_block and console_cut for real: the modules run through ``ansible`` (the .venv's, with
this checkout as the collection) inside a network namespace of this test's own, the
"hypervisor", so nft tables and sockets are that namespace's only. Clients live in a second
namespace joined by a veth pair, with IPv4, IPv6 (a /64), an IPv4-compatible address
(``::10.0.0.9``) and an IPv4 twin of it.

The veth ends also have the link-local addresses the kernel gives them (DAD off, so at once), as
ss prints them: ``[fe80::…]%IFACE:PORT`` on the hypervisor's side.

Console listeners are small Python processes in the hypervisor namespace whose process name is
set (prctl) to a console-process pattern given to the modules (``console_processes``), so port
discovery is the real thing without a QEMU; one test runs a real QEMU when it is installed.
Every outcome is judged on the hypervisor side: ``nft`` and ``ss`` in its namespace, never a
client socket's reads.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import MAX_BLOCK_SECONDS, MAX_SET_SIZE
from ansible_collections.virtguard.console.plugins.module_utils.tcp_cut import (
    SS_ESTABLISHED,
    kill_command,
    parse_established,
)
from lab.server_view import nft_blocked_networks

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / ".venv" / "bin" / "ansible"
PREFIX = f"vgbc{os.getpid() % 100000}"
HOST_NS, CLIENT_NS = f"{PREFIX}h", f"{PREFIX}c"
HOST_LINK, CLIENT_LINK = f"{PREFIX}hv", f"{PREFIX}cv"
HOST_IP, CLIENT_IP, OTHER_IP, TWIN_IP = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.9"
HOST_IP6, CLIENT_IP6, ROTATED_IP6 = "fd00:1::1", "fd00:1::2", "fd00:1::77"
COMPAT_IP6 = "::10.0.0.9"  # IPv4-compatible: an IPv6 address of its own on the wire
FAKE_QEMU = "vgfakeqemu"  # the listeners' process name (at most 15 characters)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ss"),
                       reason="needs root, nft and ss"),
]


def sh(*cmd: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


def in_host(*cmd: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", HOST_NS, *cmd, check=check, **kwargs)


def in_client(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", CLIENT_NS, *cmd, check=check)


def delete_lab() -> None:
    for ns in (HOST_NS, CLIENT_NS):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    """Two namespaces joined by a veth pair: the hypervisor (10.0.0.1, fd00:1::1) and the
    clients (10.0.0.2, .3, .9; fd00:1::2, fd00:1::77; ::10.0.0.9 with a host route back); both
    ends with their link-local address (DAD off: usable at once)."""
    delete_lab()
    try:
        sh("ip", "netns", "add", HOST_NS)
        sh("ip", "netns", "add", CLIENT_NS)
        in_host("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", CLIENT_LINK)
        in_host("ip", "link", "set", CLIENT_LINK, "netns", CLIENT_NS)
        in_host("sysctl", "-qw", f"net.ipv6.conf.{HOST_LINK}.accept_dad=0")
        in_client("sysctl", "-qw", f"net.ipv6.conf.{CLIENT_LINK}.accept_dad=0")
        for cmd in (["ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_LINK],
                    ["ip", "-6", "addr", "add", f"{HOST_IP6}/64", "dev", HOST_LINK, "nodad"],
                    ["ip", "link", "set", HOST_LINK, "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "-6", "route", "add", f"{COMPAT_IP6}/128", "dev", HOST_LINK]):
            in_host(*cmd)
        for cmd in (["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", CLIENT_LINK],
                    ["ip", "addr", "add", f"{OTHER_IP}/24", "dev", CLIENT_LINK],
                    ["ip", "addr", "add", f"{TWIN_IP}/24", "dev", CLIENT_LINK],
                    ["ip", "-6", "addr", "add", f"{CLIENT_IP6}/64", "dev", CLIENT_LINK, "nodad"],
                    ["ip", "-6", "addr", "add", f"{ROTATED_IP6}/64", "dev", CLIENT_LINK, "nodad"],
                    ["ip", "-6", "addr", "add", f"{COMPAT_IP6}/128", "dev", CLIENT_LINK, "nodad"],
                    ["ip", "link", "set", CLIENT_LINK, "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "-6", "route", "add", f"{HOST_IP6}/128", "dev", CLIENT_LINK]):
            in_client(*cmd)
        yield
    finally:
        delete_lab()


# -- processes in the namespaces ----------------------------------------------------------------

LISTENER = textwrap.dedent("""
    import ctypes, socket, sys, time
    name, host, port, backlog, accept = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    device = sys.argv[6]
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME: what ss -p shows
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in host:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack, like QEMU on ::
    if device:  # bound to an interface: ss prints ADDRESS%DEVICE:PORT
        server.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    server.bind((host, port))
    server.listen(backlog)
    print("ready", flush=True)
    held = []
    while True:
        if accept:
            held.append(server.accept()[0])
        else:
            time.sleep(3600)
""")

CLIENTS = textwrap.dedent("""
    import socket, sys, time, select
    source, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(count):
        s = socket.socket(family)
        if source:
            s.bind((source, 0))
        s.setblocking(False)
        try:
            # getaddrinfo: a link-local host carries its zone (fe80::1%IFACE)
            s.connect(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4])
        except BlockingIOError:
            pass
        socks.append(s)
    deadline = time.time() + 5
    pending = list(socks)
    while pending and time.time() < deadline:  # wait for the handshakes that can complete
        _, done, _ = select.select([], pending, [], 0.2)
        pending = [s for s in pending if s not in done]
    print("ready", flush=True)
    time.sleep(3600)
""")


class Procs:
    """Processes started by one test, stopped by it (by their own pid)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, ns: str, script: str, *args: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise AssertionError(f"{script.splitlines()[1]}... did not start: {line}{proc.stderr.read()}")
        return proc

    def listener(self, host: str, port: int, backlog: int = 128, accept: bool = True,
                 name: str = FAKE_QEMU, device: str = "") -> subprocess.Popen[str]:
        return self.start(HOST_NS, LISTENER, name, host, port, backlog, int(accept), device)

    def clients(self, source: str, host: str, port: int, count: int, ns: str = CLIENT_NS) -> subprocess.Popen[str]:
        return self.start(ns, CLIENTS, source, host, port, count)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def procs() -> Iterator[Procs]:
    started = Procs()
    yield started
    started.stop()


@pytest.fixture
def table(lab: None, request: pytest.FixtureRequest) -> Iterator[str]:
    """An nft table name of this test's own, removed afterwards."""
    name = f"vg_{request.node.name[5:20]}".replace("[", "_").replace("]", "_")
    in_host("nft", "delete", "table", "inet", name, check=False)
    yield name
    in_host("nft", "delete", "table", "inet", name, check=False)


# -- the modules, through ansible -----------------------------------------------------------------

def module(name: str, **args: Any) -> dict[str, Any]:
    """Run virtguard.console.NAME with ``args`` on localhost inside the hypervisor namespace;
    the task's result (``failed`` set when it failed)."""
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-ansible-") as tmp:
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"),
                   ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
                   ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
                   ANSIBLE_LOCAL_TEMP=tmp, ANSIBLE_HOME=tmp,
                   ANSIBLE_PYTHON_INTERPRETER=sys.executable)
        proc = in_host(str(ANSIBLE), "localhost", "-c", "local", "-m", f"virtguard.console.{name}",
                       "-a", json.dumps(args), check=False, env=env)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    except (ValueError, KeyError, IndexError):
        raise AssertionError(f"ansible said: {proc.stdout}{proc.stderr}") from None
    return result


def nft_set(table: str, name: str) -> dict[Any, int | None]:
    """The elements of a set in the hypervisor namespace: address value -> seconds left."""
    listed = json.loads(in_host("nft", "-j", "list", "set", "inet", table, name).stdout)
    found: dict[Any, int | None] = {}
    for item in [i["set"] for i in listed["nftables"] if "set" in i][0].get("elem", []):
        if isinstance(item, dict):
            found[ipaddress.ip_address(item["elem"]["val"])] = item["elem"].get("expires")
        else:
            found[ipaddress.ip_address(item)] = None
    return found


def seconds_left(found: dict[Any, int | None], address: str) -> int:
    """The seconds the element of ``address`` has left in ``found`` (nft_set); an element
    without a timeout (a permanent block) fails the test."""
    left = found[ipaddress.ip_address(address)]
    assert left is not None, f"{address} is blocked without a timeout"
    return left


def nft_set_size(table: str, name: str) -> int | None:
    listed = json.loads(in_host("nft", "-j", "list", "set", "inet", table, name).stdout)
    size: int | None = [i["set"] for i in listed["nftables"] if "set" in i][0].get("size")
    return size


def established(port: int) -> list[Any]:
    """The peers (address values, IPv4-mapped as IPv4) of established connections to ``port``
    in the hypervisor namespace: the server side, accept queue included."""
    out = in_host("ss", "-t", "-n", "-H", "state", "established", f"( sport = :{port} )").stdout
    peers = []
    for line in out.splitlines():
        peer = line.split()[3].rpartition(":")[0].strip("[]")
        address = ipaddress.ip_address(peer)
        peers.append(address.ipv4_mapped or address if address.version == 6 else address)
    return peers


def client_ports(port: int) -> list[tuple[Any, int]]:
    """(peer address value, peer port) of the established connections to ``port`` in the
    hypervisor namespace, as ``established`` reads them."""
    out = in_host("ss", "-t", "-n", "-H", "state", "established", f"( sport = :{port} )").stdout
    found = []
    for line in out.splitlines():
        host, _sep, peer_port = line.split()[3].rpartition(":")
        address = ipaddress.ip_address(host.strip("[]"))
        found.append((address.ipv4_mapped or address if address.version == 6 else address, int(peer_port)))
    return sorted(found)


def link_local(ns: str, link: str) -> str:
    """The link-local address of ``link`` in namespace ``ns`` (there at once: DAD is off)."""
    def address() -> str | None:
        out = sh("ip", "netns", "exec", ns, "ip", "-6", "-o", "addr", "show", "dev", link, "scope", "link").stdout
        return out.split()[3].split("/")[0] if "fe80" in out else None
    assert wait_for(lambda: address() is not None), f"{link} has no link-local address"
    found = address()
    assert found is not None
    return found


def listening_ports() -> set[int]:
    """The ports something listens on in the hypervisor namespace."""
    listing = in_host("ss", "-t", "-l", "-n", "-H").stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in listing.splitlines()}


def refused(source: str, host: str, port: int) -> bool:
    """Whether a connection from ``source`` (in the client namespace) gets a reset."""
    script = ("import socket,sys\n"
              "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[2] else socket.AF_INET)\n"
              "s.bind((sys.argv[1],0)); s.settimeout(5)\n"
              "try:\n    s.connect((sys.argv[2], int(sys.argv[3]))); print('connected')\n"
              "except ConnectionRefusedError:\n    print('refused')\n")
    out = in_client(sys.executable, "-c", script, source, host, str(port)).stdout.strip()
    return out == "refused"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Polls a condition on the hypervisor side (connections appear asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


# -- console_block ----------------------------------------------------------------------------------

def test_a_batch_of_200_ipv4_addresses_is_blocked_in_one_run(table: str) -> None:
    batch = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(200)]
    result = module("console_block", addresses=batch, ports=["5900-5999"], table=table, timeout=600,
                    discover_ports=False)
    assert not result.get("failed"), result
    assert result["verified"] and result["ruleset_created"] and not result["set_full"]
    assert sorted(e["network"] for e in result["blocked"]) == sorted(batch)
    assert not any(e["already_blocked"] for e in result["blocked"])
    assert set(nft_set(table, "blocked_ipv4")) == {ipaddress.ip_address(a) for a in batch}
    assert nft_set_size(table, "blocked_ipv4") == 65536
    assert result["ports"] == ["5900-5999"]

    again = module("console_block", addresses=batch[:10], table=table, timeout=900, discover_ports=False)
    assert all(e["already_blocked"] for e in again["blocked"]) and len(again["blocked"]) == 10
    left = nft_set(table, "blocked_ipv4")
    # refreshed: the re-blocked ones got the new, longer timeout; the others kept theirs
    assert all(seconds_left(left, a) > 600 for a in batch[:10])
    assert all(seconds_left(left, a) <= 600 for a in batch[10:])


def test_an_ipv6_64_blocks_every_address_in_it_and_only_those(table: str, procs: Procs) -> None:
    port = 5911
    procs.listener("::", port)
    assert not refused(ROTATED_IP6, HOST_IP6, port)
    result = module("console_block", addresses=["fd00:1::/64"], table=table,
                    console_processes=[FAKE_QEMU])
    assert not result.get("failed"), result
    assert str(port) in result["discovered_ports"] and str(port) in result["ports"]
    assert result["blocked"][0]["set"] == "blocked_ipv6_p64"
    assert set(nft_set(table, "blocked_ipv6_p64")) == {ipaddress.ip_address("fd00:1::")}
    assert refused(ROTATED_IP6, HOST_IP6, port) and refused(CLIENT_IP6, HOST_IP6, port)
    assert not refused(CLIENT_IP, HOST_IP, port)  # the IPv4 client is not in the /64

    # an address inside the blocked /64 counts as blocked: its /64 is refreshed, no new element
    inside = module("console_block", addresses=["fd00:1::99"], table=table, console_processes=[FAKE_QEMU])
    assert inside["blocked"] == [dict(inside["blocked"][0], network="fd00:1::/64", already_blocked=True)]
    assert nft_set(table, "blocked_ipv6") == {}


def test_ipv4_compatible_and_ipv4_mapped_clients_are_blocked(table: str, procs: Procs) -> None:
    port = 5912
    procs.listener("::", port)
    result = module("console_block", addresses=[COMPAT_IP6, f"::ffff:{CLIENT_IP}"], table=table,
                    console_processes=[FAKE_QEMU])
    assert not result.get("failed"), result
    assert result["verified"]
    assert set(nft_set(table, "blocked_ipv6")) == {ipaddress.ip_address(COMPAT_IP6)}
    assert set(nft_set(table, "blocked_ipv4")) == {ipaddress.ip_address(CLIENT_IP)}
    assert refused(COMPAT_IP6, HOST_IP6, port)
    assert refused(CLIENT_IP, HOST_IP, port)
    assert not refused(TWIN_IP, HOST_IP, port)  # 10.0.0.9 is not ::10.0.0.9


def test_a_full_set_that_may_not_widen_fails_clearly_and_blocks_what_fits(table: str) -> None:
    batch = [f"192.0.2.{i}" for i in range(1, 7)] + ["2001:db8::1"]
    # the /24 holds a protected address and nothing is blocked yet to make room: two are left out
    result = module("console_block", addresses=batch, table=table, set_size=4, ports=[5900], discover_ports=False,
                    protected_networks=["192.0.2.99"])
    assert result.get("failed") and result["set_full"]
    assert "blocked_ipv4 is full (4 elements)" in result["msg"]
    assert sorted(e["network"] for e in result["not_blocked"]) == ["192.0.2.5", "192.0.2.6"]
    assert result["widened"] == [] and result["evicted"] == []
    assert len(nft_set(table, "blocked_ipv4")) == 4
    assert set(nft_set(table, "blocked_ipv6")) == {ipaddress.ip_address("2001:db8::1")}  # the rest went in


OFFENDER_NET = "198.19.0.0/16"  # offenders of the full-set test, on the client link, routed back by the host
PROTECTED_IP = "198.19.1.200"  # a trusted client next to the first ten


@pytest.fixture
def offenders(lab: None) -> Iterator[list[str]]:
    """30 offender addresses on the client link, ten in each of three /24s, and a route back
    from the hypervisor; removed afterwards."""
    addresses = [f"198.19.{net}.{host}" for net in (1, 2, 3) for host in range(1, 11)]
    in_host("ip", "route", "replace", OFFENDER_NET, "dev", HOST_LINK)
    try:
        for address in addresses + [PROTECTED_IP]:
            in_client("ip", "addr", "add", f"{address}/32", "dev", CLIENT_LINK)
        yield addresses
    finally:
        for address in addresses + [PROTECTED_IP]:
            in_client("ip", "addr", "del", f"{address}/32", "dev", CLIENT_LINK, check=False)
        in_host("ip", "route", "del", OFFENDER_NET, "dev", HOST_LINK, check=False)


def refused_sources(sources: list[str], host: str, port: int) -> dict[str, bool]:
    """Whether a connection from each of ``sources`` (client namespace) gets a reset; one process."""
    script = ("import json,socket,sys\n"
              "found = {}\n"
              "for source in sys.argv[3:]:\n"
              "    s = socket.socket(); s.bind((source, 0)); s.settimeout(5)\n"
              "    try:\n        s.connect((sys.argv[1], int(sys.argv[2]))); found[source] = False\n"
              "    except ConnectionRefusedError:\n        found[source] = True\n"
              "    s.close()\n"
              "print(json.dumps(found))\n")
    result: dict[str, bool] = json.loads(in_client(sys.executable, "-c", script, host, str(port), *sources).stdout)
    return result


def test_a_full_set_widens_so_that_every_offender_of_every_batch_stays_refused(
        table: str, procs: Procs, offenders: list[str]) -> None:
    port = 5914
    procs.listener(HOST_IP, port)
    results = []
    for start in range(0, 30, 10):  # three batches, as three remediation runs would send them
        results.append(module("console_block", addresses=offenders[start:start + 10], table=table, set_size=10,
                              console_processes=[FAKE_QEMU], protected_networks=[f"{PROTECTED_IP}/32"]))
        assert not results[-1].get("failed"), results[-1]
    first, second, third = results
    assert first["widened"] == [] and first["evicted"] == []
    # the first ten's /24 would be the first choice (groups of ten, the lowest network first),
    # but it holds the protected address: the second ten's /24, then the third's make the room
    assert second["widened"] == [{"network": "198.19.2.0/24", "set": "blocked_ipv4_p24", "covers": offenders[10:20]}]
    assert third["widened"] == [{"network": "198.19.3.0/24", "set": "blocked_ipv4_p24", "covers": offenders[20:]}]
    assert all(not r["set_full"] and r["not_blocked"] == [] and r["evicted"] == [] for r in results)

    held = nft_blocked_networks(table, HOST_NS)
    assert held == {ipaddress.ip_network("198.19.2.0/24"), ipaddress.ip_network("198.19.3.0/24")} | {
        ipaddress.ip_network(a) for a in offenders[:10]}
    assert len(nft_set(table, "blocked_ipv4")) <= 10 and len(nft_set(table, "blocked_ipv4_p24")) <= 10
    assert not any(ipaddress.ip_address(PROTECTED_IP) in network for network in held)
    # judged by the hypervisor's kernel too: every offender gets a reset, the protected client a session
    answers = refused_sources(offenders + [PROTECTED_IP], HOST_IP, port)
    assert [a for a in offenders if not answers[a]] == []
    assert answers[PROTECTED_IP] is False


def test_a_table_of_the_0_1_0_shape_is_migrated_with_its_blocks(table: str, procs: Procs) -> None:
    port = 5913
    procs.listener(HOST_IP, port)
    reject = 'tcp dport @console_ports reject with tcp reset comment "virtguard console block"'
    in_host("nft", "-f", "-", input=textwrap.dedent(f"""\
        add table inet {table}
        add set inet {table} console_ports {{ type inet_service; flags interval; auto-merge; }}
        add set inet {table} blocked_ipv4 {{ type ipv4_addr; flags timeout; }}
        add set inet {table} blocked_ipv6 {{ type ipv6_addr; flags timeout; }}
        add chain inet {table} input {{ type filter hook input priority -10; policy accept; }}
        add rule inet {table} input ip saddr @blocked_ipv4 {reject}
        add rule inet {table} input ip6 saddr @blocked_ipv6 {reject}
        add element inet {table} console_ports {{ {port} }}
        add element inet {table} blocked_ipv4 {{ {CLIENT_IP} timeout 300s }}
        add element inet {table} blocked_ipv6 {{ {COMPAT_IP6} timeout 300s }}
        """))
    result = module("console_block", addresses=[OTHER_IP], table=table, console_processes=[FAKE_QEMU])
    assert not result.get("failed"), result
    assert result["migrated"] == ["blocked_ipv4", "blocked_ipv6"]
    assert nft_set_size(table, "blocked_ipv4") == 65536 and nft_set_size(table, "blocked_ipv6") == 65536
    carried = nft_set(table, "blocked_ipv4")
    assert set(carried) == {ipaddress.ip_address(CLIENT_IP), ipaddress.ip_address(OTHER_IP)}
    assert seconds_left(carried, CLIENT_IP) <= 300  # the time it had left, not a new block
    assert set(nft_set(table, "blocked_ipv6")) == {ipaddress.ip_address(COMPAT_IP6)}
    # the carried-over and the new block both hold, through the new rules
    assert refused(CLIENT_IP, HOST_IP, port) and refused(OTHER_IP, HOST_IP, port)
    assert not refused(TWIN_IP, HOST_IP, port)


def test_the_longest_block_and_largest_set_are_what_nft_takes(table: str) -> None:
    result = module("console_block", addresses=["192.0.2.1"], table=table, timeout=MAX_BLOCK_SECONDS,
                    set_size=MAX_SET_SIZE, ports=[5900], discover_ports=False)
    assert not result.get("failed"), result
    assert nft_set_size(table, "blocked_ipv4") == MAX_SET_SIZE
    assert seconds_left(nft_set(table, "blocked_ipv4"), "192.0.2.1") > MAX_BLOCK_SECONDS - 60
    # nft itself refuses the next power of ten, the limit MAX_BLOCK_SECONDS stays under
    refused_by_nft = in_host("nft", "add", "element", "inet", table, "blocked_ipv4", "{ 192.0.2.2 timeout 100000000s }",
                             check=False)
    assert refused_by_nft.returncode != 0 and "value too large" in refused_by_nft.stderr
    too_long = module("console_block", addresses=["192.0.2.3"], table=table, timeout=MAX_BLOCK_SECONDS + 1,
                      discover_ports=False)
    assert too_long.get("failed") and "timeout must be a whole number of seconds from 1 to" in too_long["msg"]


# -- console_cut ------------------------------------------------------------------------------------

def test_hundreds_of_connections_are_cut_and_others_kept(procs: Procs, lab: None) -> None:
    port = 5921
    procs.listener("::", port)
    procs.clients(CLIENT_IP, HOST_IP, port, 300)
    procs.clients(OTHER_IP, HOST_IP, port, 5)
    assert wait_for(lambda: len(established(port)) == 305)
    result = module("console_cut", addresses=[CLIENT_IP, "192.0.2.0/24"], console_processes=[FAKE_QEMU])
    assert not result.get("failed"), result
    assert result["verified"] and len(result["cut"]) == 300 and result["remaining"] == []
    assert str(port) in result["ports"]
    peers = established(port)
    assert ipaddress.ip_address(CLIENT_IP) not in peers
    assert peers.count(ipaddress.ip_address(OTHER_IP)) == 5


def test_connections_waiting_in_the_accept_queue_are_cut(procs: Procs, lab: None) -> None:
    port = 5922
    procs.listener(HOST_IP, port, backlog=1, accept=False)  # like QEMU's VNC listener, never accepting
    procs.clients(CLIENT_IP, HOST_IP, port, 6)
    assert wait_for(lambda: len(established(port)) >= 1)  # handshakes done, waiting to be accepted
    queued = len(established(port))
    result = module("console_cut", addresses=[CLIENT_IP], console_processes=[FAKE_QEMU])
    assert not result.get("failed"), result
    assert len(result["cut"]) >= queued and result["verified"]
    assert established(port) == []


def test_an_ipv4_compatible_client_is_cut_and_its_ipv4_twin_is_another_client(procs: Procs, lab: None) -> None:
    port = 5923
    procs.listener("::", port)
    procs.clients(COMPAT_IP6, HOST_IP6, port, 2)
    procs.clients(TWIN_IP, HOST_IP, port, 2)
    compat, twin = ipaddress.ip_address(COMPAT_IP6), ipaddress.ip_address(TWIN_IP)
    assert wait_for(lambda: sorted(map(str, established(port))) == sorted(map(str, [compat, compat, twin, twin])))

    twin_cut = module("console_cut", addresses=[f"::ffff:{TWIN_IP}"], console_processes=[FAKE_QEMU])
    assert not twin_cut.get("failed"), twin_cut
    assert {c["peer_address"] for c in twin_cut["cut"]} == {f"::ffff:{TWIN_IP}"}  # as ss prints it
    assert established(port) == [compat, compat]

    compat_cut = module("console_cut", addresses=[COMPAT_IP6], console_processes=[FAKE_QEMU])
    assert not compat_cut.get("failed"), compat_cut
    assert len(compat_cut["cut"]) == 2 and established(port) == []


def test_the_single_connection_form_of_0_1_0_still_works(procs: Procs, lab: None) -> None:
    port = 5924
    procs.listener(HOST_IP, port)
    procs.clients(CLIENT_IP, HOST_IP, port, 2)
    assert wait_for(lambda: len(established(port)) == 2)
    out = in_host("ss", "-t", "-n", "-H", "state", "established", f"( sport = :{port} )").stdout
    client_port = int(out.splitlines()[0].split()[3].rpartition(":")[2])
    result = module("console_cut", address=CLIENT_IP, client_port=client_port, ports=[str(port)],
                    discover_ports=False)
    assert not result.get("failed"), result
    assert result["address"] == CLIENT_IP and [c["peer_port"] for c in result["cut"]] == [client_port]
    assert len(established(port)) == 1
    assert [d["msg"] for d in result["deprecations"]] == [
        "Param 'address' is deprecated. See the module docs for more information"]


def test_link_local_and_interface_bound_connections_are_cut_with_the_others(procs: Procs, lab: None) -> None:
    """A link-local client's socket is bound to its interface, and ss prints its local end
    [fe80::…]%IFACE:PORT; so does a listener bound with SO_BINDTODEVICE (127.0.0.1%lo:PORT).
    ss refuses a zone in a filter: one such connection used to fail the whole ss -K command,
    and with it the cut of every other connection of the batch."""
    dual, bound = 5925, 5926
    procs.listener("::", dual)
    procs.listener("0.0.0.0", bound, device="lo")
    host_ll, client_ll = link_local(HOST_NS, HOST_LINK), link_local(CLIENT_NS, CLIENT_LINK)
    procs.clients("", f"{host_ll}%{CLIENT_LINK}", dual, 2)  # from the link-local address: the kernel picks it
    procs.clients(CLIENT_IP, HOST_IP, dual, 3)
    procs.clients("127.0.0.1", "127.0.0.1", bound, 2, ns=HOST_NS)
    assert wait_for(lambda: len(established(dual)) == 5 and len(established(bound)) == 2)
    shown = in_host("ss", "-t", "-n", "-H", "state", "established").stdout
    assert f"[{host_ll}]%{HOST_LINK}:{dual}" in shown and f"127.0.0.1%lo:{bound}" in shown  # the forms in question

    result = module("console_cut", addresses=[client_ll, CLIENT_IP, "127.0.0.1"], console_processes=[FAKE_QEMU])
    assert not result.get("failed"), result
    assert result["verified"] and result["not_cut"] == [] and result["remaining"] == []
    assert sorted((c["peer_address"], c["local_port"]) for c in result["cut"]) == sorted(
        [(client_ll, dual)] * 2 + [(f"::ffff:{CLIENT_IP}", dual)] * 3 + [("127.0.0.1", bound)] * 2)
    assert established(dual) == [] and established(bound) == []


def test_ss_kills_a_link_local_connection_named_as_the_cut_names_it_and_refuses_its_zone(
        procs: Procs, lab: None) -> None:
    """What the cut relies on, asked of the real ss: the zone form it prints is refused as a
    filter (the whole command fails), and the cut's form (address without zone, interface by
    index) destroys exactly the connection named, not its twin from the same address."""
    port = 5928
    procs.listener("::", port)
    host_ll = link_local(HOST_NS, HOST_LINK)
    procs.clients("", f"{host_ll}%{CLIENT_LINK}", port, 2)
    assert wait_for(lambda: len(established(port)) == 2)
    named, twin = [c for c in parse_established(in_host(*SS_ESTABLISHED).stdout) if c.local_port == port]
    assert named.interface == twin.interface == HOST_LINK and named.local_address == host_ll

    zoned = in_host("ss", "-t", "-n", "-H", "-K", "state", "established",
                    "(", "src", f"[{host_ll}]%{HOST_LINK}:{port}", ")", check=False)
    assert zoned.returncode != 0 and "does not look like a port" in zoned.stderr
    index = int(in_host("cat", f"/sys/class/net/{HOST_LINK}/ifindex").stdout)
    in_host(*kill_command([named], {HOST_LINK: index + 1000}))  # another interface: nothing matches
    assert len(established(port)) == 2
    in_host(*kill_command([named], {HOST_LINK: index}))
    assert client_ports(port) == [(ipaddress.ip_address(twin.peer_address), twin.peer_port)]


def test_a_session_is_cut_exactly_and_never_blocked(table: str, procs: Procs) -> None:
    port = 5927
    procs.listener("::", port)
    procs.clients(CLIENT_IP, HOST_IP, port, 2)
    procs.clients(OTHER_IP, HOST_IP, port, 1)
    client, other = ipaddress.ip_address(CLIENT_IP), ipaddress.ip_address(OTHER_IP)
    assert wait_for(lambda: len(client_ports(port)) == 3)
    before = client_ports(port)
    (_c, named), (_c2, kept) = [p for p in before if p[0] == client]
    other_connection = [p for p in before if p[0] == other]

    # only the session: cut, nothing blocked, the address's other connection kept
    result = module("console_remediate", sessions=[{"address": CLIENT_IP, "client_port": named, "console_port": port}],
                    table=table, console_processes=[FAKE_QEMU])
    assert not result.get("failed"), result
    assert [(c["peer_address"], c["peer_port"]) for c in result["cut"]["cut"]] == [(f"::ffff:{CLIENT_IP}", named)]
    assert result["cut"]["failed"] == [] and result["cut"]["verified"]
    assert result["block"]["skipped"] and result["block"]["ok"]
    assert client_ports(port) == sorted([(client, kept), *other_connection])
    assert in_host("nft", "list", "table", "inet", table, check=False).returncode != 0, "a table was made"
    assert not refused(CLIENT_IP, HOST_IP, port)

    # with a batch to block: the batch's address is blocked and cut, the session's is neither
    both = module("console_remediate", addresses=[OTHER_IP], sessions=[{"address": CLIENT_IP, "client_port": 1}],
                  table=table, console_processes=[FAKE_QEMU])
    assert not both.get("failed"), both
    assert set(nft_set(table, "blocked_ipv4")) == {other}
    assert client_ports(port) == [(client, kept)]
    assert not refused(CLIENT_IP, HOST_IP, port) and refused(OTHER_IP, HOST_IP, port)

    # console_cut takes the same form
    cut = module("console_cut", sessions=[{"address": f"::ffff:{CLIENT_IP}", "client_port": kept}],
                 console_processes=[FAKE_QEMU])
    assert not cut.get("failed"), cut
    assert cut["sessions"] == [{"address": CLIENT_IP, "client_port": kept, "console_port": None}]
    assert client_ports(port) == []


def test_a_bad_session_is_refused_naming_it_before_anything_runs(table: str) -> None:
    result = module("console_remediate", addresses=["192.0.2.1"], table=table, ports=[5900], discover_ports=False,
                    sessions=[{"address": CLIENT_IP, "client_port": 5}, {"address": "10.0.0.0/24", "client_port": 6}])
    assert result.get("failed") and result["msg"] == "sessions[1]: address '10.0.0.0/24' is not an IP address"
    assert in_host("nft", "list", "table", "inet", table, check=False).returncode != 0  # nothing blocked


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
def test_a_real_qemu_s_console_ports_are_found_and_its_vnc_client_cut(table: str, procs: Procs) -> None:
    display, websocket, spice = 41, 5741, 5951
    qemu = subprocess.Popen(["ip", "netns", "exec", HOST_NS, "qemu-system-x86_64", "-S", "-nodefaults",
                             "-display", "none", "-m", "48", "-machine", "pc",
                             "-vnc", f"0.0.0.0:{display},websocket={websocket}",
                             "-spice", f"port={spice},addr=0.0.0.0,disable-ticketing=on", "-vga", "qxl"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        vnc = 5900 + display
        assert wait_for(lambda: {vnc, websocket, spice} <= listening_ports())
        procs.clients(CLIENT_IP, HOST_IP, vnc, 1)
        assert wait_for(lambda: established(vnc) == [ipaddress.ip_address(CLIENT_IP)])

        blocked = module("console_block", addresses=[CLIENT_IP], table=table)  # default console_processes
        assert not blocked.get("failed"), blocked
        assert {str(vnc), str(websocket), str(spice)} <= set(blocked["discovered_ports"])
        assert refused(CLIENT_IP, HOST_IP, spice)

        cut = module("console_cut", addresses=[CLIENT_IP])
        assert not cut.get("failed"), cut
        assert [c["local_port"] for c in cut["cut"]] == [vnc] and established(vnc) == []
    finally:
        qemu.kill()
        qemu.wait()
