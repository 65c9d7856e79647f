"""The console_firewall role, through the collection's configure_console_firewall playbook and
the variables file the rulebooks read, run over SSH against fleet hosts of their own (lab.fleet:
own network and mount namespaces, a system libvirtd, sshd and nftables), with console clients in
client network namespaces of their own: a trusted one, whose network the variables file lists,
and an untrusted one.

Everything is judged on the host: its nftables (``nft`` in the host), its sockets (``ss`` in its
network namespace), libvirt's events (``virsh event --loop``: none for a refused client, and a
trusted client's session in the same witness as the control) and QEMU's client list
(``query-vnc``).

What each test needs comes from its fixtures, never from an earlier test: a host the role never
configured (wrong variables fail at start and change nothing; check mode changes nothing), and a
host the role configured, with a console started before the role and one started after it; the
fixture records the check run, the first run and the second run it made there. Tests that change
that host put it back as the variables file has it before they end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
import yaml

from lab.fleet import FleetHost, ssh_inventory
from lab.fleet_sessions import FleetClients, open_console_session
from lab.hypervisor import DOMAIN_XML, PREFIX, Domain, EventWitness, wait_for
from lab.netns import ClientNamespace
from lab.playbook_runs import playbook_env, recap, snapshot
from lab.server_view import established_peers, nft_blocks, vnc_clients

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QEMU_CONF = "/etc/libvirt/qemu.conf"
TABLE = "virtguard_console_firewall"
REMEDIATION_TABLE = f"vgfwr{os.getpid()}"  # the rulebooks' virtguard_nft_table, per process
CLIENT_INDEXES = range(12, 16)  # lab.netns indexes of this module's client namespaces
TRUSTED_INDEX, UNTRUSTED_INDEX, OTHER_INDEX = 12, 13, 14
DISPLAY_RANGE = (5900, 6899)  # the role's defaults
WEBSOCKET_RANGE = (5700, 5899)
FIXED_PORT = 7100  # outside both ranges
OUTGOING_PORT = 6800  # a local port in the display range, for the host's own outgoing connection
OPERATOR_QEMU_CONF = """\
# Operator's settings, kept by the role.
#remote_display_port_min = 5900
remote_display_port_max = 65535
"""
RANGE_KEYS = {"remote_display_port_min": 5900, "remote_display_port_max": 6899,
              "remote_websocket_port_min": 5700, "remote_websocket_port_max": 5899}


@dataclass
class Run:
    """One ansible-playbook run: what it printed and the host's PLAY RECAP counts."""

    proc: subprocess.CompletedProcess[str]
    counts: dict[str, int]

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


@dataclass
class Site:
    """A fleet host, the controller's directory (inventory, the variables file) and the
    variables file's content: the rulebooks' variables, which the playbook turns into the role's."""

    host: FleetHost
    controller: Path
    policy: dict[str, Any]
    domains: dict[str, Domain] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)  # the fixture's runs: check, first, second
    pids: dict[str, int | None] = field(default_factory=dict)  # libvirtd's, before and after each
    tables_after_check: set[str] = field(default_factory=set)

    def playbook(self, *extra: str, extra_vars: dict[str, Any] | None = None) -> Run:
        """configure_console_firewall on the host over SSH, with the variables file as extra
        vars (``-e @console_policy.yml``, as the docs have it) and ``extra_vars`` after it."""
        inventory = self.controller / "inventory.yml"
        inventory.write_text(yaml.safe_dump(ssh_inventory({self.host.hostname: self.host}, "hypervisors")))
        policy = self.controller / "console_policy.yml"
        policy.write_text(yaml.safe_dump(self.policy))
        args = ["-e", f"@{policy}"]
        if extra_vars:
            more = self.controller / "extra.json"
            more.write_text(json.dumps(extra_vars))
            args += ["-e", f"@{more}"]
        proc = subprocess.run(
            [str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(inventory),
             "virtguard.console.configure_console_firewall", *args, *extra],
            capture_output=True, text=True, env=playbook_env(), cwd=self.controller, timeout=600, check=False)
        return Run(proc, recap(proc.stdout, self.host.hostname))

    def apply(self, **extra_vars: Any) -> Run:
        run = self.playbook(extra_vars=extra_vars)
        assert run.proc.returncode == 0, run.output
        return run

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run(["nft", *args], check=check)

    def table(self, name: str = TABLE) -> dict[str, Any] | None:
        """The table as nft lists it in the host (JSON), by kind and name; None without one."""
        listed = self.nft("-j", "list", "table", "inet", name, check=False)
        if listed.returncode != 0:
            return None
        found: dict[str, Any] = {}
        for item in json.loads(listed.stdout)["nftables"]:
            kind, value = next(iter(item.items()))
            if kind in ("set", "counter", "chain"):
                found.setdefault(kind, {})[value["name"]] = value
            elif kind == "rule":
                found.setdefault("rules", []).append(value)
        return found

    def tables(self) -> set[str]:
        return set(re.findall(r"^table inet (\S+)$", self.nft("list", "tables").stdout, re.M))

    def refused(self) -> int:
        table = self.table()
        assert table is not None
        return int(table["counter"]["refused"]["packets"])

    def counters(self) -> dict[str, int]:
        """The table's counters (packets): allowed, refused and, with a rate limit, rate_limited."""
        table = self.table()
        assert table is not None
        return {name: int(counter["packets"]) for name, counter in table["counter"].items()}

    def refused_sources(self) -> set[str]:
        table = self.table()
        assert table is not None
        found = set()
        for name in ("refused_ipv4_sources", "refused_ipv6_sources"):
            for elem in table["set"][name].get("elem", []):
                found.add(elem["elem"]["val"] if isinstance(elem, dict) else elem)
        return found

    def guarded_ports(self) -> list[tuple[int, int]]:
        table = self.table()
        assert table is not None
        ports: list[tuple[int, int]] = []
        for elem in table["set"]["console_ports"].get("elem", []):
            ports.append((elem["range"][0], elem["range"][1]) if isinstance(elem, dict) else (elem, elem))
        return ports

    def qemu_conf(self) -> str:
        return self.host.path(QEMU_CONF).read_text()

    def configuration(self) -> tuple[dict[str, Any], set[str], int | None]:
        """What the role may change: qemu.conf, the host's nftables tables, libvirtd's pid."""
        return snapshot(self.host.path(QEMU_CONF)), self.tables(), self.host.libvirtd_pid()


def allowed_elements(table: dict[str, Any], version: int) -> set[str]:
    """The elements of an allowed set as nft lists them: ``ADDR/LEN`` or an address."""
    return {f"{e['prefix']['addr']}/{e['prefix']['len']}" if isinstance(e, dict) else e
            for e in table["set"][f"allowed_ipv{version}"].get("elem", [])}


def port_range(ports: list[tuple[int, int]], port: int) -> bool:
    return any(low <= port <= high for low, high in ports)


def attempt(ns: ClientNamespace, address: str, port: int) -> str:
    """A new TCP connection from ``ns``: ``refused`` (a reset answered its SYN), ``connected``
    (closed at once) or ``timeout``."""
    def connect() -> str:
        try:
            socket.create_connection((address, port), 5).close()
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        return "connected"
    outcome: str = ns.call(connect)
    return outcome


def storm(address: str, port: int, seconds: float, clients: int = 8) -> dict[str, float]:
    """New connections to ``address:port`` from ``clients`` threads, each one after the other as
    fast as they go and closed at once, for ``seconds``: how many were connected, refused (a
    reset) and timed out, and how long the storm took. QEMU's VNC backlog is 1, so the kernel
    drops a SYN while QEMU has not accepted the last one: the 0.5 s timeout gives such a client
    up before its SYN is sent again (1 s), so that every SYN the firewall judged is one outcome."""
    outcomes = {"connected": 0, "refused": 0, "timeout": 0}
    lock = threading.Lock()
    start = time.monotonic()

    def client() -> None:
        while time.monotonic() - start < seconds:
            try:
                socket.create_connection((address, port), 0.5).close()
                outcome = "connected"
            except ConnectionRefusedError:
                outcome = "refused"
            except TimeoutError:
                outcome = "timeout"
            with lock:
                outcomes[outcome] += 1
    threads = [threading.Thread(target=client) for _client in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {**outcomes, "seconds": time.monotonic() - start}


def attempts_on_host(site: Site, port: int, pairs: list[tuple[str, str]], spacing: float = 0.0) -> dict[str, Any]:
    """New connections made on the host itself, in one process, one for each (source address,
    destination address) of ``pairs``, ``spacing`` seconds apart: ``outcomes`` (``connected``,
    ``refused`` or ``timeout`` for each) and how many ``seconds`` they took."""
    code = ("import json, socket, time\n"
            "outcomes, start = [], time.monotonic()\n"
            f"for source, destination in {pairs!r}:\n"
            "    try:\n"
            f"        socket.create_connection((destination, {port}), 2, source_address=(source, 0)).close()\n"
            "        outcomes.append('connected')\n"
            "    except ConnectionRefusedError:\n"
            "        outcomes.append('refused')\n"
            "    except TimeoutError:\n"
            "        outcomes.append('timeout')\n"
            f"    time.sleep({spacing})\n"
            "print(json.dumps({'outcomes': outcomes, 'seconds': time.monotonic() - start}))\n")
    result: dict[str, Any] = json.loads(site.host.run(["python3", "-c", code], timeout=120).stdout)
    return result


def loopback_attempts(site: Site, port: int, count: int, spacing: float) -> list[str]:
    """``count`` new connections from the host's 127.0.0.1 (an allowed address: the console
    proxies'), ``spacing`` seconds apart: ``connected``, ``refused`` or ``timeout`` for each."""
    outcomes: list[str] = attempts_on_host(site, port, [("127.0.0.1", "127.0.0.1")] * count, spacing)["outcomes"]
    return outcomes


def storm_beside_loopback(site: Site, client: ClientNamespace, port: int) -> tuple[dict[str, float], list[str]]:
    """A 4 s storm from ``client`` and, while it lasts, 5 attempts from the host's loopback (the
    storm's start is given 0.5 s, and it must outlast them)."""
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(client.call, storm, site.host.address, port, 4.0)
        time.sleep(0.5)
        others = loopback_attempts(site, port, 5, 0.2)
        others_done = time.monotonic() - started
        outcome = future.result()
    assert others_done < outcome["seconds"], "the loopback attempts were not made while the storm lasted"
    return outcome, others


def graphics_events(output: str, domain: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"event 'graphics' for domain '{domain}'")]


def domain_xml(name: str, graphics: str) -> str:
    xml = DOMAIN_XML.format(name=escape(name), listen="").replace(" listen=''", "")
    xml = re.sub(r"<graphics type='vnc' autoport='yes'/>", graphics, xml)
    return xml.replace("'cirrus'", "'qxl'") if "spice" in graphics else xml


def start_domain(host: FleetHost, name: str, graphics: str, persistent: bool = False) -> str:
    """A paused domain with ``graphics``; its live XML."""
    xml_file = host.root / "domains" / f"{name}.xml"
    xml_file.parent.mkdir(exist_ok=True)
    xml_file.write_text(domain_xml(name, graphics))
    if persistent:
        host.virsh("define", str(xml_file))
        host.virsh("start", "--paused", name)
    else:
        host.virsh("create", "--paused", str(xml_file))
    return str(host.virsh("dumpxml", name).stdout)


def remove_domain(host: FleetHost, name: str) -> None:
    host.virsh("destroy", name, check=False)
    host.virsh("undefine", name, check=False)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def lab_tools() -> None:
    """What these tests need; missing, they fail (never skip: a green run must have run them)."""
    missing = [tool for tool in ("libvirtd", "virtlogd", "nft", "ss", "nsenter", "sshd", "ssh", "virsh")
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if os.geteuid() != 0 or missing:
        pytest.fail(f"the console firewall tests need root and {', '.join(missing) or 'nothing more'}: "
                    "run `make deps` (hacking/bootstrap.sh) as root", pytrace=False)


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, ClientNamespace]]:
    """A trusted client (its network is in the variables file), an untrusted one and another
    one (a network the tests add and take away again), each reaching every fleet host."""
    made = FleetClients(CLIENT_INDEXES, tag="fw")
    try:
        yield {"trusted": made.make(TRUSTED_INDEX), "untrusted": made.make(UNTRUSTED_INDEX),
               "other": made.make(OTHER_INDEX)}
    finally:
        made.delete()


@contextlib.contextmanager
def new_site(clients: dict[str, ClientNamespace]) -> Iterator[Site]:
    """A fleet host with a console running, and the variables file the rulebooks would read."""
    host = FleetHost()
    controller = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-fw-controller-"))
    try:
        host.start()
        with host.path(QEMU_CONF).open("a") as conf:  # an operator's settings: one commented, one set
            conf.write(OPERATOR_QEMU_CONF)
        site = Site(host, controller, {
            "virtguard_trusted_networks": [clients["trusted"].network, clients["trusted"].network6],
            "virtguard_console_proxies": ["127.0.0.1", "::1"],
            "virtguard_nft_table": REMEDIATION_TABLE,
        })
        site.domains["before"] = host.create_domain(f"{host.name}-before")
        yield site
    finally:
        host.stop()
        shutil.rmtree(controller, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh(clients: dict[str, ClientNamespace]) -> Iterator[Site]:
    """A host the role never configured: its tests fail at start or run in check mode."""
    with new_site(clients) as site:
        yield site


@pytest.fixture(scope="module")
def guarded(clients: dict[str, ClientNamespace]) -> Iterator[Site]:
    """A host on which the playbook ran in check mode, then for real, then again; a console
    started before the role and one started after it (after libvirtd's restart)."""
    with new_site(clients) as site:
        site.pids["before"] = site.host.libvirtd_pid()
        site.runs["check"] = site.playbook("--check")
        site.pids["after check"] = site.host.libvirtd_pid()
        site.tables_after_check = site.tables()
        site.runs["first"] = site.playbook()
        site.pids["after first"] = site.host.libvirtd_pid()
        site.runs["second"] = site.playbook()
        site.pids["after second"] = site.host.libvirtd_pid()
        site.domains["after"] = site.host.create_domain(f"{site.host.name}-after")
        yield site


@pytest.fixture
def host_back_as_configured(guarded: Site) -> Iterator[Site]:
    """For a test that changes the guarded host: the variables file's table again afterwards."""
    yield guarded
    guarded.apply()


# -- wrong variables fail at start, and change nothing ----------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"virtguard_trusted_networks": [], "virtguard_console_proxies": []},
     "console_firewall_allowed_networks is empty: every console client would be refused"),
    ({"virtguard_trusted_networks": ["10.0.0.0/33"]}, "allowed_networks: '10.0.0.0/33' is not a network"),
    ({"console_firewall_table": REMEDIATION_TABLE}, "is the remediation's table"),
    ({"console_firewall_display_port_min": 5000}, "libvirt takes console_firewall_display_port_min..max"),
    ({"console_firewall_display_port_max": 50000}, "hold libvirt's migration ports (49152-49215)"),
    ({"console_firewall_websocket_port_max": 16600}, "hold libvirtd's TLS port (16514)"),
    ({"console_firewall_state": "closed"}, "console_firewall_state"),
    ({"console_firewall_rate_per_source": -5}, "rate_per_source must be a whole number of new connections a second"),
    ({"console_firewall_rate_total": "many"}, "console_firewall_rate_total"),
])
def test_wrong_variables_fail_at_start_and_change_nothing(fresh: Site, bad, message):
    before = fresh.configuration()
    run = fresh.playbook(extra_vars=bad)
    assert run.proc.returncode != 0
    assert message in run.output
    assert run.counts.get("changed") == 0
    assert fresh.configuration() == before


# -- check mode, a first run, a second run --------------------------------------------------------
def test_check_mode_on_a_fresh_host_reports_the_changes_and_changes_nothing(fresh: Site):
    before = fresh.configuration()
    run = fresh.playbook("--check", "-v")
    assert run.proc.returncode == 0, run.output
    assert run.counts["changed"] >= 3, run.output  # the table, qemu.conf's keys, the restart
    assert f"table inet {TABLE} does not exist" in run.output
    assert fresh.configuration() == before
    assert TABLE not in fresh.tables()


def test_the_fixture_ran_check_mode_first_and_it_changed_nothing(guarded: Site):
    check = guarded.runs["check"]
    assert check.proc.returncode == 0, check.output
    assert check.counts["changed"] >= 3
    assert TABLE not in guarded.tables_after_check
    assert guarded.pids["after check"] == guarded.pids["before"]


def test_first_run_guards_the_ranges_and_the_domains_and_narrows_libvirts_ranges(guarded: Site):
    first = guarded.runs["first"]
    assert first.proc.returncode == 0, first.output
    assert first.counts["changed"] >= 3
    # one restart of libvirtd, through the pidfile (no systemd here), for the new ranges
    assert guarded.pids["after first"] not in (None, guarded.pids["before"])
    conf = guarded.qemu_conf().splitlines()
    for key, value in RANGE_KEYS.items():
        assert f"{key} = {value}" in conf
    assert 'vnc_listen = "0.0.0.0"' in conf and 'security_driver = "none"' in conf  # the rest kept
    assert "# Operator's settings, kept by the role." in conf and "remote_display_port_max = 65535" not in conf
    # a key that was only commented out is set right below it; a key that was set is set in its place
    assert conf.index("#remote_display_port_min = 5900") + 1 == conf.index("remote_display_port_min = 5900")
    assert conf.index("remote_display_port_min = 5900") + 1 == conf.index("remote_display_port_max = 6899")

    table = guarded.table()
    assert table is not None
    assert guarded.guarded_ports() == [(5700, 6899)]  # the two ranges, adjacent
    assert guarded.domains["before"].vnc_port in range(5900, 6900)
    trusted4, trusted6 = guarded.policy["virtguard_trusted_networks"]
    assert allowed_elements(table, 4) == {trusted4, "127.0.0.1"}
    assert allowed_elements(table, 6) == {trusted6, "::1"}
    base = table["chain"]["input"]
    assert (base["hook"], base["prio"], base["policy"]) == ("input", -20, "accept")
    [entry] = [rule for rule in table["rules"] if rule["chain"] == "input"]
    assert "ct" in json.dumps(entry["expr"]) and '"syn"' in json.dumps(entry["expr"])
    assert "0 new console connections refused" in first.output


def test_second_run_and_check_run_change_nothing(guarded: Site):
    second = guarded.runs["second"]
    assert second.proc.returncode == 0, second.output
    assert second.counts["changed"] == 0, second.output
    assert guarded.pids["after second"] == guarded.pids["after first"]
    check = guarded.playbook("--check")
    assert check.counts["changed"] == 0, check.output


# -- untrusted clients get no session, trusted ones are unaffected ----------------------------------
@pytest.mark.parametrize("console", ["before", "after"])
def test_an_untrusted_client_gets_no_session_and_a_trusted_one_does(guarded: Site, clients, console):
    """On the console that existed before the role, and on one started after it."""
    domain = guarded.domains[console]
    untrusted, trusted = clients["untrusted"], clients["trusted"]
    assert port_range(guarded.guarded_ports(), domain.vnc_port)
    refused_before = guarded.refused()
    witness = EventWitness(guarded.host.local_uri, domain.name)
    try:
        assert attempt(untrusted, guarded.host.address, domain.vnc_port) == "refused"
        # the control: a trusted client's whole session, seen by the same witness
        session = open_console_session(trusted, guarded.host, domain)
        assert session.held()
        session.close()
    finally:
        events = graphics_events(witness.stop(disconnects=1), domain.name)
    assert [line.split(":")[1].split()[0] for line in events] == ["connect", "initialize", "disconnect"], events
    assert all(trusted.client_ip in line for line in events)
    assert not any(untrusted.client_ip in line for line in events)
    assert guarded.refused() == refused_before + 1
    assert untrusted.client_ip in guarded.refused_sources()
    assert trusted.client_ip not in guarded.refused_sources()
    peers = established_peers([domain.vnc_port], netns=guarded.host.name)
    assert not any(str(address) == untrusted.client_ip for address, _port in peers)
    assert not any(str(address) == untrusted.client_ip
                   for address, _port in vnc_clients(guarded.host.query_vnc(domain.name)))


def test_the_role_reports_the_refused_attempts(guarded: Site, clients):
    domain = guarded.domains["before"]
    assert attempt(clients["untrusted"], guarded.host.address, domain.vnc_port) == "refused"
    run = guarded.playbook()
    assert run.counts["changed"] == 0, run.output
    report = re.search(r"(\d+) new console connections refused, \d+ allowed since the table was made: "
                       r"refused sources \(last 24 h\) ([^;]*);", run.output)
    assert report is not None, run.output
    assert int(report[1]) == guarded.refused() >= 1
    assert clients["untrusted"].client_ip in report[2].split(", ")


def test_websocket_and_spice_consoles_started_afterwards_are_guarded(guarded: Site, clients):
    vnc_name, spice_name = f"{guarded.host.name}-ws", f"{guarded.host.name}-spice"
    try:
        vnc = start_domain(guarded.host, vnc_name, "<graphics type='vnc' autoport='yes' websocket='-1'/>")
        spice_xml = ("<graphics type='spice' autoport='yes' listen='0.0.0.0'>"
                     "<listen type='address' address='0.0.0.0'/></graphics>")
        spice = start_domain(guarded.host, spice_name, spice_xml)
        websocket = int(re.search(r"websocket='(\d+)'", vnc)[1])  # type: ignore[index]
        spice_port = int(re.search(r"<graphics type='spice' port='(\d+)'", spice)[1])  # type: ignore[index]
        assert WEBSOCKET_RANGE[0] <= websocket <= WEBSOCKET_RANGE[1]
        assert DISPLAY_RANGE[0] <= spice_port <= DISPLAY_RANGE[1]
        for port in (websocket, spice_port):
            refused_before = guarded.refused()
            assert attempt(clients["untrusted"], guarded.host.address, port) == "refused", port
            assert guarded.refused() == refused_before + 1  # the firewall's reset, not a closed port's
            held = clients["trusted"].connect(guarded.host.address, port)
            try:
                wait_for(lambda p=port: any(str(a) == clients["trusted"].client_ip for a, _port in
                                            established_peers([p], netns=guarded.host.name)),
                         10, f"the trusted connection to {port} on the host")
            finally:
                held.close()
    finally:
        remove_domain(guarded.host, vnc_name)
        remove_domain(guarded.host, spice_name)


def test_a_fixed_port_outside_the_ranges_is_guarded_from_the_next_run(host_back_as_configured: Site, clients):
    site = host_back_as_configured
    name = f"{site.host.name}-fixed"
    try:
        start_domain(site.host, name, f"<graphics type='vnc' port='{FIXED_PORT}' autoport='no'/>", persistent=True)
        # what the docs say a domain defined after the run gets: nothing until the next run
        assert attempt(clients["untrusted"], site.host.address, FIXED_PORT) == "connected"
        run = site.apply()
        assert run.counts["changed"] == 1, run.output
        assert port_range(site.guarded_ports(), FIXED_PORT)
        assert attempt(clients["untrusted"], site.host.address, FIXED_PORT) == "refused"
        session = open_console_session(clients["trusted"], site.host,
                                       Domain(name=name, uuid="", vnc_port=FIXED_PORT))
        session.close()
        # defined but shut off: its fixed port stays guarded
        site.host.virsh("destroy", name)
        assert site.apply().counts["changed"] == 0
        assert port_range(site.guarded_ports(), FIXED_PORT)
    finally:
        remove_domain(site.host, name)


# -- nothing else of the host changes -------------------------------------------------------------
def test_the_hosts_own_outgoing_connections_work_from_a_guarded_port(guarded: Site, clients):
    """A reply to the host's own connection arrives on its local port, which may lie in a guarded
    range (ephemeral ports overlap libvirt's default ranges): only a lone SYN is ever judged."""
    untrusted = clients["untrusted"]
    assert port_range(guarded.guarded_ports(), OUTGOING_PORT)
    server = untrusted.call(socket.create_server, (untrusted.client_ip, 0))
    port = server.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        for _connection in range(2):
            connection, _peer = server.accept()
            with connection:
                received.append(connection.recv(100))
                connection.sendall(b"pong from an untrusted network\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    refused_before = guarded.refused()
    answers = []
    try:
        for source_port in (OUTGOING_PORT, 0):  # a guarded port, then an ephemeral one
            code = (f"import socket; s = socket.create_connection(({untrusted.client_ip!r}, {port}), 10, "
                    f"source_address=({guarded.host.address!r}, {source_port})); s.sendall(b'ping'); "
                    "print(s.recv(100).decode().strip())")
            answers.append(guarded.host.run(["python3", "-c", code], timeout=30).stdout.strip())
        thread.join(10)
    finally:
        server.close()
    assert answers == ["pong from an untrusted network"] * 2
    assert received == [b"ping"] * 2
    assert guarded.refused() == refused_before


def test_sshd_and_libvirtds_tls_port_answer_an_untrusted_address(guarded: Site, clients):
    untrusted = clients["untrusted"]

    def banner() -> bytes:
        with socket.create_connection((guarded.host.address, 22), 10) as sock:
            return sock.recv(64)
    assert untrusted.call(banner).startswith(b"SSH-2.0-")
    assert attempt(untrusted, guarded.host.address, 16514) == "connected"


def test_a_run_that_changes_the_rules_keeps_a_trusted_session(host_back_as_configured: Site, clients):
    site = host_back_as_configured
    domain = site.domains["before"]
    session = open_console_session(clients["trusted"], site.host, domain)
    try:
        wider = dict(site.policy, virtguard_trusted_networks=site.policy["virtguard_trusted_networks"]
                     + [clients["other"].network])
        run = site.playbook(extra_vars={"virtguard_trusted_networks": wider["virtguard_trusted_networks"]})
        assert run.counts["changed"] == 1, run.output
        assert attempt(clients["other"], site.host.address, domain.vnc_port) == "connected"
        assert session.held()
        assert site.apply().counts["changed"] == 1  # back to the variables file
        assert attempt(clients["other"], site.host.address, domain.vnc_port) == "refused"
        assert session.held()
    finally:
        session.close()


def test_the_remediation_table_coexists_and_still_blocks_inside_the_allowed_networks(guarded: Site, clients):
    trusted = clients["trusted"]
    domain = guarded.domains["before"]
    inventory = guarded.controller / "inventory.yml"
    ansible = [str(ROOT / ".venv/bin/ansible"), "-i", str(inventory), guarded.host.hostname, "-m",
               "virtguard.console.console_block"]
    block = {"addresses": [trusted.client_ip], "table": REMEDIATION_TABLE, "timeout": 300, "ports": ["5900-5999"]}
    try:
        proc = subprocess.run([*ansible, "-a", json.dumps(block)], capture_output=True, text=True,
                              env=playbook_env(), timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert nft_blocks(REMEDIATION_TABLE, trusted.client_ip, netns=guarded.host.name)
        run = guarded.playbook()
        assert run.counts["changed"] == 0, run.output
        assert guarded.tables() >= {TABLE, REMEDIATION_TABLE}
        assert nft_blocks(REMEDIATION_TABLE, trusted.client_ip, netns=guarded.host.name)
        # the firewall lets the trusted network through; the remediation's block still refuses it
        refused_before = guarded.refused()
        assert attempt(trusted, guarded.host.address, domain.vnc_port) == "refused"
        assert guarded.refused() == refused_before
        assert trusted.client_ip not in guarded.refused_sources()
    finally:
        guarded.nft("delete", "table", "inet", REMEDIATION_TABLE, check=False)
    session = open_console_session(trusted, guarded.host, domain)
    session.close()


def test_state_absent_removes_the_table_and_nothing_else(host_back_as_configured: Site, clients):
    site = host_back_as_configured
    domain = site.domains["before"]
    conf = site.qemu_conf()
    check = site.playbook("--check", extra_vars={"console_firewall_state": "absent"})
    assert check.counts["changed"] == 1, check.output
    assert TABLE in site.tables()
    run = site.apply(console_firewall_state="absent")
    assert run.counts["changed"] == 1, run.output
    assert TABLE not in site.tables()
    assert site.qemu_conf() == conf
    assert attempt(clients["untrusted"], site.host.address, domain.vnc_port) == "connected"
    assert site.apply(console_firewall_state="absent").counts["changed"] == 0


def test_ipv6_clients_are_judged_by_the_allowed_ipv6_networks(guarded: Site, clients):
    """No IPv6 route reaches a fleet host, so the clients are addresses of the host itself, on
    its loopback (its input hook judges those packets too): one in the trusted IPv6 /64 of the
    variables file, one in the untrusted client's; the console listens on every IPv6 address."""
    host = guarded.host
    inside = str(ipaddress.ip_network(clients["trusted"].network6)[0x99])
    outside = str(ipaddress.ip_network(clients["untrusted"].network6)[0x99])
    name = f"{host.name}-v6"
    try:
        for address in (inside, outside):
            host.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"])
        xml = start_domain(host, name, "<graphics type='vnc' autoport='yes' listen='::'/>")
        port = int(re.search(r"<graphics type='vnc' port='(\d+)'", xml)[1])  # type: ignore[index]

        def banner(source: str) -> str:
            code = ("import socket\ntry:\n"
                    f"    s = socket.create_connection(({inside!r}, {port}), 5, source_address=({source!r}, 0))\n"
                    "    print(s.recv(12).decode().strip())\n"
                    "except ConnectionRefusedError:\n    print('refused')\n")
            return str(host.run(["python3", "-c", code], timeout=30).stdout.strip())
        refused_before = guarded.refused()
        assert banner(outside) == "refused"
        assert guarded.refused() == refused_before + 1
        assert outside in guarded.refused_sources()
        assert banner(inside) == "RFB 003.008"
        assert inside not in guarded.refused_sources()
    finally:
        remove_domain(host, name)
        for address in (inside, outside):
            host.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"], check=False)


def test_domains_that_cannot_be_read_fail_the_run_after_the_table_is_made(host_back_as_configured: Site,
                                                                          clients):
    """libvirtd down: the run still writes the table (the ranges, the ports it guarded before,
    the new allowed list) and then fails, saying why."""
    site = host_back_as_configured
    other = clients["other"]
    domain = site.domains["before"]
    site.host.kill_libvirtd(signal.SIGTERM)
    try:
        run = site.playbook(extra_vars={"virtguard_trusted_networks":
                                        site.policy["virtguard_trusted_networks"] + [other.network]})
        assert run.proc.returncode != 0
        assert "the console ports of the domains were not read" in run.output
        assert attempt(other, site.host.address, domain.vnc_port) == "connected"  # the new list
        assert site.guarded_ports() == [(5700, 6899)]
    finally:
        site.host.start_libvirtd()


# -- rate limits: a storm from inside the allowed networks -----------------------------------------
def connects_from(events: list[str], address: str) -> int:
    return sum(1 for line in events if line.split(":")[1].split()[0] == "connect" and f" {address} " in line)


def storm_witnessed(
        site: Site, client: ClientNamespace, domain: Domain) -> tuple[dict[str, float], list[str], list[str]]:
    """storm_beside_loopback on ``domain``'s console, with libvirt's graphics events of the
    domain meanwhile, once every connection QEMU accepted has its disconnect event."""
    witness = EventWitness(site.host.local_uri, domain.name)
    try:
        outcome, others = storm_beside_loopback(site, client, domain.vnc_port)
        output = witness.stop(disconnects=int(outcome["connected"]) + others.count("connected"))
    finally:
        witness.close()
    return outcome, others, graphics_events(output, domain.name)


def test_a_total_rate_limit_bounds_what_reaches_qemu_from_every_source(host_back_as_configured: Site, clients):
    """10 a second in all (burst 20): the storm and the host's 127.0.0.1 together reach QEMU 20
    times plus 10 a second; the loopback's attempts during the storm are refused with it. A
    second run changes nothing and reports the refusals."""
    site = host_back_as_configured
    domain, trusted = site.domains["before"], clients["trusted"]
    assert site.apply(console_firewall_rate_total=10).counts["changed"] == 1
    before = site.counters()
    outcome, others, events = storm_witnessed(site, trusted, domain)
    after = site.counters()
    connected = outcome["connected"] + others.count("connected")
    let_through = after["allowed"] - before["allowed"]  # SYNs, a few of them dropped by QEMU's full backlog
    assert 20 <= let_through <= 20 + 10 * outcome["seconds"] + 2, (outcome, others, let_through)
    assert connected <= let_through
    assert outcome["refused"] > 100, outcome
    # a token comes every 0.1 s and the storm takes it within a millisecond or so
    assert others.count("refused") >= 3, others
    assert after["rate_limited"] - before["rate_limited"] == outcome["refused"] + others.count("refused")
    assert connects_from(events, trusted.client_ip) == outcome["connected"], events[-5:]
    assert connects_from(events, "127.0.0.1") == others.count("connected"), events[-5:]
    again = site.playbook(extra_vars={"console_firewall_rate_total": 10})
    assert again.counts["changed"] == 0, again.output
    assert f"{after['rate_limited']} refused over the rate limits" in again.output


def test_a_per_source_rate_limit_bounds_one_sources_storm_and_spares_the_others(host_back_as_configured: Site,
                                                                                clients):
    """5 a second per source (burst 20): the trusted client's storm reaches QEMU 20 times plus 5
    a second, and the host's 127.0.0.1, another allowed source, connects every time meanwhile.
    Judged on the host: its counters, and libvirt's own connect events."""
    site = host_back_as_configured
    domain, trusted = site.domains["before"], clients["trusted"]
    run = site.apply(console_firewall_rate_per_source=5)
    assert run.counts["changed"] == 1, run.output
    assert "0 refused over the rate limits" in run.output
    before = site.counters()
    outcome, others, events = storm_witnessed(site, trusted, domain)
    after = site.counters()
    let_through = after["allowed"] - before["allowed"]  # SYNs, a few of them dropped by QEMU's full backlog
    loopback_syns = 5 - others.count("timeout")  # as many SYNs as the loopback's connections or more
    assert 20 + loopback_syns <= let_through <= 20 + 5 * outcome["seconds"] + 2 + 10, (outcome, others, let_through)
    assert outcome["connected"] <= let_through
    assert outcome["refused"] > 100, outcome  # the storm went on, far over the limit
    assert "refused" not in others and others.count("connected") >= 3, others
    assert after["rate_limited"] - before["rate_limited"] == outcome["refused"]
    assert after["refused"] == before["refused"]
    assert connects_from(events, trusted.client_ip) == outcome["connected"], events[-5:]


def test_a_per_source_rate_limit_takes_an_ipv6_source_as_its_64(host_back_as_configured: Site, clients):
    """An attacker who rotates addresses inside one IPv6 /64 (the trusted one here) meets one
    budget, not one per address; ::1, another allowed /64, keeps its own. As in the IPv6 test
    above, the clients are addresses of the host itself, on its loopback."""
    site = host_back_as_configured
    host = site.host
    network = ipaddress.ip_network(clients["trusted"].network6)
    rotated = [str(network[0x1000 + n]) for n in range(30)]
    name = f"{host.name}-v6rate"
    try:
        for address in rotated:
            host.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"])
        xml = start_domain(host, name, "<graphics type='vnc' autoport='yes' listen='::'/>")
        port = int(re.search(r"<graphics type='vnc' port='(\d+)'", xml)[1])  # type: ignore[index]
        assert site.apply(console_firewall_rate_per_source=5).counts["changed"] == 1
        before = site.counters()
        # 90 connections, each from the next of the 30 addresses, as fast as they go, then ::1
        result = attempts_on_host(site, port, [(source, rotated[0]) for source in rotated * 3] + [("::1", "::1")])
        after = site.counters()
        *rotation, loopback = result["outcomes"]
        let_through = rotation.count("connected") + rotation.count("timeout")
        assert 20 <= let_through <= 20 + 5 * result["seconds"] + 2, result
        assert rotation.count("refused") >= 90 - (20 + 5 * result["seconds"] + 2), result
        assert loopback == "connected", result
        assert after["rate_limited"] - before["rate_limited"] == rotation.count("refused")
    finally:
        remove_domain(host, name)
        for address in rotated:
            host.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"], check=False)
