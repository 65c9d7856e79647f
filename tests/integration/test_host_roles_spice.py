"""SPICE TLS and SASL from the host roles (vnc_tls's ``vnc_tls_spice``, vnc_sasl's
``vnc_sasl_spice``), through the collection's own playbook configure_console_tls, run over SSH
against a real system libvirtd on fleet hosts of their own (lab.system_libvirtd, lab.fleet), with
real SPICE clients from Debian's spice-client-gtk in a client network namespace of their own.

What each test needs comes from its fixtures, never from an earlier test: a host the roles never
configured (check mode), a host they configured with SPICE on, their first run recorded, and a
TLS-only SPICE domain on it. The clients:
- ``spicy-screenshot`` (connects, saves a screen shot, leaves). It has no option for a CA file
  (0.42 only takes --uri, -h, -p, -s, -w, -o) and verifies the server against OpenSSL's default
  store, so the CA reaches it as ``SSL_CERT_FILE``. It takes the SASL user from the URI
  (``spice://USER@HOST?tls-port=PORT``) and the password from ``-w``.
- ``spicy`` under ``xvfb-run``, held open while QEMU is asked what it serves (``query-spice``);
  it takes ``--spice-ca-file`` and ``--spice-secure-channels=all``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
import yaml

from lab.fleet import route_clients_to_fleet, ssh_inventory
from lab.hypervisor import DOMAIN_XML, PREFIX, EventWitness, wait_for
from lab.netns import ClientNamespace
from lab.playbook_runs import playbook_env, recap, snapshot
from lab.spice_clients import HeldSpicy
from lab.system_libvirtd import QEMU_CONF, SystemLibvirtd

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks" / "configure_console_tls.yml"
CERT_DIR = "/etc/pki/libvirt-vnc"
SPICE_CERT_DIR = "/etc/pki/libvirt-spice"
SASL_DIR = "/etc/sasl2"
CERT_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")

SASL_USER = f"{PREFIX}spiceuser"
PASSWORD = secrets.token_urlsafe(12)
CLIENT_NS_INDEX = 27  # lab.netns index of this module's client namespace (0..31, one per process)


@dataclass
class Site:
    """A lab host running a system libvirtd, the controller's directory (the CA) and the role
    variables that turn SPICE TLS and SASL on."""

    system: SystemLibvirtd
    controller: Path
    role_vars: dict[str, Any] = field(default_factory=dict)
    first_run: subprocess.CompletedProcess[str] | None = None
    pids: tuple[int | None, int | None] = (None, None)  # libvirtd before and after the first run

    @property
    def address(self) -> str:
        return self.system.host.address

    def path(self, host_path: str) -> Path:
        return self.system.host.path(host_path)

    def configuration(self) -> dict[str, tuple[str, int, int, int] | None]:
        """What the roles write on the host, and the controller's CA."""
        return snapshot(self.path(QEMU_CONF), self.path("/etc/pki"), self.path(SASL_DIR), self.controller / "ca")

    def playbook(self, variables: dict[str, Any],
                 *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
        """The collection's configure_console_tls on the host over SSH (group ``hypervisors``,
        its default); the variables as extra vars (a 0600 file)."""
        inventory = self.controller / "inventory.yml"
        inventory.write_text(yaml.safe_dump(ssh_inventory({self.system.host.name: self.system.host}, "hypervisors")))
        vars_file = self.controller / "vars.json"
        vars_file.touch(mode=0o600)
        vars_file.write_text(json.dumps(variables))
        proc = subprocess.run(
            [str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(inventory), str(PLAYBOOK), "-e", f"@{vars_file}",
             *extra],
            capture_output=True, text=True, env=playbook_env(), cwd=self.controller, timeout=300, check=False)
        return proc, recap(proc.stdout, self.system.host.name)

    def ca_cert(self) -> Path:
        return self.controller / "ca" / "ca-cert.pem"


@dataclass
class SpiceDomain:
    name: str
    tls_port: int
    port: int | None  # the plain port; None when libvirt gave the domain none


def spice_domain_xml(name: str, default_mode: str | None) -> str:
    """A tiny domain with SPICE graphics (qxl video), autoport, listening where qemu.conf says
    (spice_listen); ``default_mode='secure'`` makes every channel TLS-only."""
    mode = f" defaultMode='{default_mode}'" if default_mode else ""
    return (DOMAIN_XML.format(name=escape(name), listen="").replace(" listen=''", "")
            .replace("<graphics type='vnc' autoport='yes'", f"<graphics type='spice' autoport='yes'{mode}")
            .replace("'cirrus'", "'qxl'"))


def start_spice_domain(site: Site, name: str, default_mode: str | None = "secure") -> SpiceDomain:
    host = site.system.host
    xml_file = host.root / "domains" / f"{name}.xml"
    xml_file.parent.mkdir(exist_ok=True)
    xml_file.write_text(spice_domain_xml(name, default_mode))
    host.virsh("create", "--paused", str(xml_file))
    graphics = ET.fromstring(host.virsh("dumpxml", name).stdout).find("devices/graphics")
    assert graphics is not None and graphics.get("type") == "spice"
    port = int(graphics.get("port", "-1"))
    return SpiceDomain(name=name, tls_port=int(graphics.get("tlsPort", "-1")), port=port if port > 0 else None)


@contextlib.contextmanager
def spice_domain(site: Site, tag: str, default_mode: str | None = "secure") -> Iterator[SpiceDomain]:
    domain = start_spice_domain(site, f"{PREFIX}-spice-{tag}", default_mode)
    try:
        yield domain
    finally:
        site.system.virsh("destroy", domain.name, check=False)


def query_spice(site: Site, domain: SpiceDomain) -> dict[str, Any]:
    """QEMU's own view of the domain's SPICE server and its connected channels."""
    out = site.system.virsh("qemu-monitor-command", domain.name, '{"execute":"query-spice"}').stdout
    result: dict[str, Any] = json.loads(out)["return"]
    return result


def screenshot(ns: ClientNamespace, uri: str, ca_cert: Path | None, password: str,
               workdir: Path) -> subprocess.CompletedProcess[str]:
    """spicy-screenshot from the client namespace; the CA through OpenSSL's default store
    (SSL_CERT_FILE; an empty file trusts nothing). Refused, it exits by itself."""
    trust = ca_cert if ca_cert is not None else workdir / "no-ca.pem"
    trust.touch()
    return ns.run(["env", f"SSL_CERT_FILE={trust}", "spicy-screenshot", "--uri", uri, "-w", password,
                   "-o", str(workdir / "screen.ppm")], check=False, timeout=60)


def sasl_uri(site: Site, domain: SpiceDomain, user: str = SASL_USER) -> str:
    return f"spice://{user}@{site.address}?tls-port={domain.tls_port}"


def held_spicy(site: Site, domain: SpiceDomain, ns: ClientNamespace, ca_cert: Path) -> HeldSpicy:
    """``spicy`` under xvfb-run in the client namespace, logged in by SASL, every channel over
    TLS, held until closed (a context manager)."""
    return HeldSpicy(site.address, tls_port=domain.tls_port, password=PASSWORD, ca_pem=ca_cert.read_bytes(),
                     netns=ns.name, username=SASL_USER, secure_channels=True)


def channels_of(site: Site, domain: SpiceDomain, client_ip: str) -> list[dict[str, Any]]:
    return [c for c in query_spice(site, domain).get("channels", []) if c.get("host") == client_ip]


def held_channels(site: Site, domain: SpiceDomain, client_ip: str, count: int) -> list[dict[str, Any]]:
    """The client's channels once it holds ``count`` of them, else an empty list."""
    channels = channels_of(site, domain, client_ip)
    return channels if len(channels) >= count else []


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def lab_tools() -> None:
    """What these tests need; missing, they fail (never skip: a green run must have run them)."""
    missing = [tool for tool in ("libvirtd", "virtlogd", "spicy-screenshot", "spicy", "xvfb-run", "sasldblistusers2",
                                 "nsenter", "sshd", "ssh")
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if os.geteuid() != 0 or missing:
        pytest.fail(f"the SPICE host-role tests need root and {', '.join(missing) or 'nothing more'}: "
                    "run `make deps` (hacking/bootstrap.sh) as root", pytrace=False)


@contextlib.contextmanager
def new_site(**extra_vars: Any) -> Iterator[Site]:
    """A fleet host with its system libvirtd running and a controller directory; the role
    variables turn SPICE TLS (listening on every address) and SASL on. All removed afterwards."""
    system = SystemLibvirtd()
    controller = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-spice-controller-"))
    try:
        system.start()
        yield Site(system, controller, {
            "vnc_tls_listen": "0.0.0.0",
            "vnc_tls_ca_dir": str(controller / "ca"),
            "vnc_tls_key_size": 2048,
            "vnc_tls_spice": True,
            "vnc_sasl_spice": True,
            "vnc_sasl_users": [{"name": SASL_USER, "password": PASSWORD}],
            **extra_vars,
        })
    finally:
        system.stop()
        shutil.rmtree(controller, ignore_errors=True)


def first_run(site: Site) -> Site:
    """Run the playbook on a host it never configured; the run must succeed."""
    before = site.system.pid()
    proc, _counts = site.playbook(site.role_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site.first_run, site.pids = proc, (before, site.system.pid())
    return site


@pytest.fixture(scope="module")
def fresh_site() -> Iterator[Site]:
    """A host the roles never configured: its tests run in check mode and check that nothing
    changed."""
    with new_site() as site:
        yield site


@pytest.fixture(scope="module")
def configured_site() -> Iterator[Site]:
    with new_site() as site:
        yield first_run(site)


@pytest.fixture(scope="module")
def client_ns() -> Iterator[ClientNamespace]:
    """A client with an address of its own, routed to this process's fleet hosts."""
    ns = ClientNamespace(CLIENT_NS_INDEX, tag="sp").create()
    try:
        route_clients_to_fleet(ns)
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def tls_domain(configured_site: Site) -> Iterator[SpiceDomain]:
    """A TLS-only SPICE domain (``defaultMode='secure'``) started after the roles configured
    libvirtd."""
    with spice_domain(configured_site, "tls") as domain:
        yield domain


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-spice-client-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- check mode, a first run, a second run ---------------------------------------------------------
def test_check_mode_with_spice_on_a_fresh_host_reports_changes_and_changes_nothing(fresh_site: Site):
    before = fresh_site.configuration()
    pid = fresh_site.system.pid()
    proc, counts = fresh_site.playbook(fresh_site.role_vars, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] > 0
    for key in ("spice_tls", "spice_tls_x509_cert_dir", "spice_listen", "spice_sasl", "spice_sasl_dir"):
        assert re.search(rf"changed: .*\(item={key}\)", proc.stdout), key
    assert fresh_site.configuration() == before
    assert fresh_site.system.pid() == pid


def test_first_run_sets_the_spice_keys_and_restarts_libvirtd_once(configured_site: Site):
    proc = configured_site.first_run
    assert proc is not None
    assert PASSWORD not in proc.stdout + proc.stderr
    pid_before, pid_after = configured_site.pids
    assert pid_after not in (None, pid_before)
    assert proc.stdout.count("Restart libvirtd for the VNC") == 2  # both handlers, one restart
    lines = configured_site.path(QEMU_CONF).read_text().splitlines()
    for line in ("spice_tls = 1", f'spice_tls_x509_cert_dir = "{CERT_DIR}"', 'spice_listen = "0.0.0.0"',
                 "spice_sasl = 1", f'spice_sasl_dir = "{SASL_DIR}"', "vnc_tls = 1", "vnc_sasl = 1"):
        assert line in lines, line


def test_second_run_changes_nothing(configured_site: Site):
    pid = configured_site.system.pid()
    for extra in ((), ("--check",)):
        proc, counts = configured_site.playbook(configured_site.role_vars, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert counts["changed"] == 0, proc.stdout
    assert configured_site.system.pid() == pid


# -- the domain's ports --------------------------------------------------------------------------
def test_autoport_gives_a_tls_port_and_secure_mode_no_plain_port(configured_site: Site):
    """With spice_tls = 1, libvirt allocates a tlsPort besides the plain port; with
    defaultMode='secure' it allocates the tlsPort only."""
    with spice_domain(configured_site, "any", default_mode=None) as any_mode:
        assert any_mode.port is not None and any_mode.tls_port > 0
        assert any_mode.port != any_mode.tls_port
    with spice_domain(configured_site, "secure") as secure:
        assert secure.tls_port > 0
        assert secure.port is None
        assert query_spice(configured_site, secure)["tls-port"] == secure.tls_port


# -- real clients ----------------------------------------------------------------------------
def test_spicy_screenshot_over_tls_with_the_roles_ca_succeeds_and_without_it_fails(
        configured_site: Site, tls_domain: SpiceDomain, client_ns: ClientNamespace, workdir: Path):
    uri = sasl_uri(configured_site, tls_domain)
    trusted = screenshot(client_ns, uri, configured_site.ca_cert(), PASSWORD, workdir)
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert (workdir / "screen.ppm").read_bytes().startswith(b"P6")
    untrusted = screenshot(client_ns, uri, None, PASSWORD, workdir)
    assert untrusted.returncode != 0
    assert "certificate" in untrusted.stderr, untrusted.stderr


def test_a_held_client_has_every_channel_over_tls(configured_site: Site, tls_domain: SpiceDomain,
                                                  client_ns: ClientNamespace):
    with held_spicy(configured_site, tls_domain, client_ns, configured_site.ca_cert()) as spicy:
        channels = wait_for(lambda: held_channels(configured_site, tls_domain, client_ns.client_ip, 4), 60,
                            "spicy's four channels in query-spice")
        assert spicy.proc.poll() is None
    assert {c["channel-type"] for c in channels} >= {1, 2, 3, 4}  # main, display, inputs, cursor
    assert all(c["tls"] is True for c in channels), channels
    assert len({c["connection-id"] for c in channels}) == 1


def test_a_plain_connection_to_a_tls_only_domain_gets_no_channel(
        configured_site: Site, tls_domain: SpiceDomain, client_ns: ClientNamespace, workdir: Path):
    plain_uri = f"spice://{SASL_USER}@{configured_site.address}?port={tls_domain.tls_port}"
    proc = screenshot(client_ns, plain_uri, configured_site.ca_cert(), PASSWORD, workdir)
    assert proc.returncode != 0
    assert not (workdir / "screen.ppm").exists()
    assert channels_of(configured_site, tls_domain, client_ns.client_ip) == []


def test_sasl_login_right_password_gets_in_wrong_password_and_no_user_are_refused(
        configured_site: Site, tls_domain: SpiceDomain, client_ns: ClientNamespace, workdir: Path):
    """QEMU's SPICE server reads the SASL configuration and users vnc_sasl wrote for VNC. A
    failed login gives connect and disconnect, never initialize.

    Neither libvirt nor QEMU says the session used SASL: libvirt starts every SPICE domain without
    a password with ``disable-ticketing=on``, which makes QEMU report ``auth: none`` (query-spice,
    and the initialize event) although spice-server still requires SASL, and a SPICE password
    cannot be set beside SASL (QEMU: "Could not set password")."""
    ca = configured_site.ca_cert()
    witness = EventWitness(configured_site.system.uri, tls_domain.name)
    try:
        good = screenshot(client_ns, sasl_uri(configured_site, tls_domain), ca, PASSWORD, workdir)
        wrong = screenshot(client_ns, sasl_uri(configured_site, tls_domain), ca, "wrong password", workdir)
        nobody = screenshot(client_ns, f"spice://{configured_site.address}?tls-port={tls_domain.tls_port}", ca,
                            PASSWORD, workdir)
    finally:
        output = witness.stop(disconnects=4)
    assert good.returncode == 0, good.stdout + good.stderr
    assert wrong.returncode != 0
    assert nobody.returncode != 0
    events = re.findall(rf"event 'graphics' for domain '{re.escape(tls_domain.name)}': (\w+) .*remote\[IPv4 "
                        rf"{re.escape(client_ns.client_ip)} (\d+)\] ?(\S*)$", output, re.M)
    by_port: dict[str, list[tuple[str, str]]] = {}
    for phase, port, auth in events:
        by_port.setdefault(port, []).append((phase, auth))
    # spicy-screenshot opens two channels (main, display); a refused login only its main channel.
    logged_in = [phases for phases in by_port.values() if ("initialize", "none") in phases]
    refused = [phases for phases in by_port.values() if [p for p, _a in phases] == ["connect", "disconnect"]]
    assert len(logged_in) == 2, output
    assert len(refused) == 2, output
    with held_spicy(configured_site, tls_domain, client_ns, ca):
        wait_for(lambda: channels_of(configured_site, tls_domain, client_ns.client_ip), 60, "spicy's channels")
        assert query_spice(configured_site, tls_domain)["auth"] == "none"  # see the docstring


# -- a SPICE certificate directory of its own -----------------------------------------------------------
def test_a_separate_spice_certificate_directory_links_the_vnc_files(client_ns: ClientNamespace, workdir: Path):
    with new_site(vnc_tls_spice_x509_cert_dir=SPICE_CERT_DIR) as site:
        before = site.configuration()
        proc, counts = site.playbook(site.role_vars, "--check")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert counts["changed"] > 0
        assert site.configuration() == before

        first_run(site)
        assert f'spice_tls_x509_cert_dir = "{SPICE_CERT_DIR}"' in site.path(QEMU_CONF).read_text().splitlines()
        directory = site.path(SPICE_CERT_DIR)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750
        for name in CERT_FILES:
            assert os.readlink(directory / name) == f"{CERT_DIR}/{name}"
        proc, counts = site.playbook(site.role_vars)
        assert counts["changed"] == 0, proc.stdout

        with spice_domain(site, "own-dir") as domain:
            qemu_cmdline = Path(f"/proc/{qemu_pid(site, domain)}/cmdline").read_bytes()
            assert f"x509-dir={SPICE_CERT_DIR},".encode() in qemu_cmdline
            shot = screenshot(client_ns, sasl_uri(site, domain), site.ca_cert(), PASSWORD, workdir)
        assert shot.returncode == 0, shot.stdout + shot.stderr


def test_the_vnc_directory_spelled_differently_keeps_its_files(configured_site: Site):
    """``/etc/pki/libvirt-vnc/`` is VNC's own directory: its files must stay files, not become
    links to themselves (the role compares normalised paths)."""
    site = configured_site
    before = {name: site.path(f"{CERT_DIR}/{name}").read_bytes() for name in CERT_FILES}
    try:
        proc, _counts = site.playbook({**site.role_vars, "vnc_tls_spice_x509_cert_dir": f"{CERT_DIR}/"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name, content in before.items():
            path = site.path(f"{CERT_DIR}/{name}")
            assert not path.is_symlink() and path.read_bytes() == content, name
    finally:
        proc, _counts = site.playbook(site.role_vars)  # back to role_vars for the tests after this one
        assert proc.returncode == 0, proc.stdout + proc.stderr


def qemu_pid(site: Site, domain: SpiceDomain) -> int:
    return int(site.path(f"/run/libvirt/qemu/{domain.name}.pid").read_text().strip())
