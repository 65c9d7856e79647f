"""The vnc_tls and vnc_sasl roles, run over SSH as on a real hypervisor, against a real system
libvirtd on fleet hosts of their own (lab.system_libvirtd, lab.fleet: own network and mount
namespaces, own /etc/libvirt, /etc/pki, /etc/sasl2 and /run), so they run whatever the machine
runs, its own system libvirtd included, and touch nothing of it.

What each test needs is set up by its fixtures, never by an earlier test: a host the roles
never configured (wrong inputs fail at start and change nothing; check mode reports changes and
changes nothing), and a host the roles configured, their first run recorded by the fixture (it
configured the host and restarted libvirtd; a second run changes nothing; a real TLS + SASL
client, gvnccapture, gets its certificate subject and SASL user name into the graphics event; a
new CA and renewed certificates reach a running domain without restarting it, through
display-reload). The CA lives in a temporary directory standing in for the controller.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from lab.fleet import ssh_inventory
from lab.hypervisor import PREFIX, Domain, EventWitness, run
from lab.playbook_runs import playbook_env, recap, snapshot
from lab.system_libvirtd import BASE_QEMU_CONF, QEMU_CONF, SystemLibvirtd
from lab.tls_console import ConsoleClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = Path(__file__).resolve().parent / "host_roles"
CERT_DIR = "/etc/pki/libvirt-vnc"
SASL_DIR = "/etc/sasl2"
SASLDB = f"{SASL_DIR}/qemu-vnc.sasldb"

# Settings an operator already has: they must survive the roles untouched, comments included.
OPERATOR_QEMU_CONF = """\
# Operator's settings, kept by the roles.
max_files = 4096
#vnc_tls = 1
vnc_tls_x509_verify = 0
#vnc_sasl = 1
"""

OPERATOR = f"{PREFIX}op"
SASL_USER = f"{PREFIX}alice"
GONE_USER = f"{PREFIX}gone"
PASSWORDS = {SASL_USER: secrets.token_urlsafe(12), GONE_USER: secrets.token_urlsafe(12)}


@dataclass
class Site:
    """A lab host running a system libvirtd with the operator's qemu.conf, the controller's
    directory (CA, client certificates) and the role variables for it."""

    system: SystemLibvirtd
    controller: Path
    role_vars: dict[str, Any] = field(default_factory=dict)
    changed: bool = False  # a test changed the configuration since role_vars were applied
    first_run: FirstRun | None = None

    def path(self, host_path: str) -> Path:
        return self.system.host.path(host_path)

    def configuration(self) -> dict[str, tuple[str, int, int, int] | None]:
        """What the roles write on the host, and the controller's CA."""
        return snapshot(self.path(QEMU_CONF), self.path(CERT_DIR), self.path(SASL_DIR), self.controller / "ca")

    def playbook(self, variables: dict[str, Any], *extra: str,
                 playbook: str = "site.yml") -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
        """ansible-playbook from the machine (the controller) on the host over SSH, in the group
        ``hypervisors``; the role variables as extra vars (a 0600 file)."""
        inventory = self.controller / "inventory.yml"
        inventory.write_text(yaml.safe_dump(ssh_inventory({self.system.host.name: self.system.host}, "hypervisors")))
        vars_file = self.controller / "vars.json"
        vars_file.touch(mode=0o600)
        vars_file.write_text(json.dumps(variables))
        proc = subprocess.run(
            [str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(inventory), str(PLAYBOOKS / playbook),
             "-e", f"@{vars_file}", *extra],
            capture_output=True, text=True, env=playbook_env(), cwd=self.controller, timeout=300, check=False)
        return proc, recap(proc.stdout, self.system.host.name)

    def configure(self) -> subprocess.CompletedProcess[str]:
        """Apply role_vars; the run must succeed."""
        proc, _counts = self.playbook(self.role_vars)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self.changed = False
        return proc


@dataclass
class FirstRun:
    """The roles' first run on a host and what it left there, recorded right after it (later
    tests may change the host)."""

    proc: subprocess.CompletedProcess[str]
    counts: dict[str, int]
    pid_before: int | None
    pid_after: int | None
    qemu_conf: str
    modes: dict[str, tuple[int, int, int]]  # path on the host -> (mode, uid, gid)
    qemu_gid: int
    sasl_conf: str
    sasl_users: set[str]
    subject_alt_names: set[str]
    host_addresses: set[str]
    client_cert_issued: bool

    @classmethod
    def of(cls, site: Site) -> FirstRun:
        """Run the roles with role_vars on a host they never configured; the run must succeed."""
        pid_before = site.system.pid()
        proc, counts = site.playbook(site.role_vars, "-v")
        assert proc.returncode == 0, proc.stdout + proc.stderr

        def mode(path: str) -> tuple[int, int, int]:
            st = site.path(path).stat()
            return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

        return cls(
            proc=proc, counts=counts, pid_before=pid_before, pid_after=site.system.pid(),
            qemu_conf=site.path(QEMU_CONF).read_text(),
            modes={path: mode(path) for path in (CERT_DIR, f"{CERT_DIR}/server-key.pem", SASLDB,
                                                 f"{SASL_DIR}/qemu.conf")},
            qemu_gid=int(site.system.host.run(["getent", "group", "libvirt-qemu"]).stdout.split(":")[2]),
            sasl_conf=site.path(f"{SASL_DIR}/qemu.conf").read_text(),
            sasl_users=sasl_users(site),
            subject_alt_names=subject_alt_names(site.path(f"{CERT_DIR}/server-cert.pem")),
            host_addresses=host_addresses(site),
            client_cert_issued=(site.controller / "ca" / "clients" / OPERATOR / "clientcert.pem").exists(),
        )


def certtool_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A CA made outside the roles, as an operator's PKI would (gnutls certtool)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, template = directory / "ca-key.pem", directory / "ca-cert.pem", directory / "ca.info"
    template.write_text(f"cn = {name}\nca\ncert_signing_key\nexpiration_days = 30\n")
    run(["certtool", "--generate-privkey", "--outfile", str(key)])
    run(["certtool", "--generate-self-signed", "--load-privkey", str(key),
         "--template", str(template), "--outfile", str(cert)])
    return cert, key


def sasl_users(site: Site) -> set[str]:
    out = run(["sasldblistusers2", "-f", str(site.path(SASLDB))]).stdout
    return {line.split("@", 1)[0] for line in out.splitlines() if "@" in line}


def host_addresses(site: Site) -> set[str]:
    """The host's addresses as the role names them (loopback aside), from ip(8) in the host."""
    found = set()
    for link in json.loads(site.system.host.run(["ip", "-j", "addr", "show"]).stdout):
        for info in link.get("addr_info", []):
            if info.get("local") not in (None, "127.0.0.1", "::1"):
                found.add("IP:" + info["local"])
    return found


def subject_alt_names(cert: Path) -> set[str]:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    ext = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ({f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)}
            | {f"IP:{a}" for a in ext.get_values_for_type(x509.IPAddress)})


def events_of(output: str) -> list[dict[str, str]]:
    """virsh event lines: one dict per event with its phase and identity lines."""
    events: list[dict[str, str]] = []
    for line in output.splitlines():
        match = re.match(r"event 'graphics' for domain '([^']+)': (\w+) .* (\S+)$", line)
        if match:
            events.append({"domain": match[1], "phase": match[2], "auth": match[3]})
        elif events and "=" in line and line.startswith("\t"):
            key, _eq, value = line.strip().partition("=")
            events[-1][key] = value
    return events


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def lab_tools() -> None:
    """What these tests need; missing, they fail (never skip: a green run must have run them)."""
    missing = [tool for tool in ("libvirtd", "virtlogd", "gvnccapture", "certtool", "sasldblistusers2", "nsenter",
                                 "sshd", "ssh")
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if os.geteuid() != 0 or missing:
        pytest.fail(f"the host-role tests need root and {', '.join(missing) or 'nothing more'}: "
                    "run `make deps` (hacking/bootstrap.sh) as root", pytrace=False)


@contextlib.contextmanager
def new_site() -> Iterator[Site]:
    """A fleet host with the operator's qemu.conf, its system libvirtd running, and a
    controller directory; all removed afterwards."""
    system = SystemLibvirtd(extra_qemu_conf=OPERATOR_QEMU_CONF)
    controller = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-controller-"))
    try:
        system.start()
        yield Site(system, controller, {
            "vnc_tls_listen": "127.0.0.1",
            "vnc_tls_ca_dir": str(controller / "ca"),
            "vnc_tls_key_size": 2048,
            "vnc_tls_client_certs": [{"name": OPERATOR, "subject": {"O": "Virtguard Tests"}}],
            "vnc_sasl_users": [{"name": name, "password": pw} for name, pw in PASSWORDS.items()],
        })
    finally:
        system.stop()
        shutil.rmtree(controller, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh_site() -> Iterator[Site]:
    """A host the roles never configured: its tests only fail at start or run in check mode,
    and each checks that nothing changed."""
    with new_site() as site:
        yield site


@pytest.fixture(scope="module")
def configured_site() -> Iterator[Site]:
    """A host the roles configured with role_vars; their first run there is recorded."""
    with new_site() as site:
        site.first_run = FirstRun.of(site)
        yield site


@pytest.fixture
def configured(configured_site: Site) -> Site:
    """The host as role_vars configure it (applied again if a test changed it meanwhile)."""
    if configured_site.changed:
        configured_site.configure()
    return configured_site


@pytest.fixture
def changeable(configured: Site) -> Site:
    """As ``configured``, for a test that changes the configuration: marked changed before the
    test starts, so the next test gets role_vars applied again whatever this one did."""
    configured.changed = True
    return configured


@pytest.fixture
def client() -> Iterator[ConsoleClient]:
    homes = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-client-"))
    os.chmod(homes, 0o755)  # the client's user must reach its home
    console_client = ConsoleClient.create("c", homes)
    yield console_client
    console_client.remove()
    shutil.rmtree(homes, ignore_errors=True)


@contextlib.contextmanager
def running_domain(site: Site, name: str) -> Iterator[Domain]:
    domain = site.system.create_domain(f"{PREFIX}-{name}")
    try:
        yield domain
    finally:
        site.system.virsh("destroy", domain.name, check=False)


def install_issued_identity(client: ConsoleClient, issued: Path) -> None:
    """The CA certificate, client certificate and key the role issued into ``issued``."""
    client.install_identity((issued / "cacert.pem").read_bytes(), (issued / "clientcert.pem").read_bytes(),
                            (issued / "clientkey.pem").read_bytes())


def console_session(site: Site, client: ConsoleClient, domain: Domain, password: str) -> tuple[int, str]:
    """gvnccapture in the host's network namespace (the console listens on its 127.0.0.1)."""
    return client.capture(site.system.host.name, "127.0.0.1", domain.vnc_port - 5900, SASL_USER, password,
                          timeout=90)


# -- wrong inputs fail at start, before anything changes ----------------------------------------
# Each role checks its variables when it starts: one role per play here, so that nothing at
# all may change.
@pytest.mark.parametrize("role_playbook, bad, message", [
    ("sasl.yml", {"vnc_sasl_users": [{"name": "nopassword"}]},
     "state is present but all of the following are missing: password found in vnc_sasl_users"),
    ("sasl.yml", {"vnc_sasl_update_password": "sometimes"}, "vnc_sasl_update_password"),
    ("tls.yml", {"vnc_tls_renew_days": "soon"}, "vnc_tls_renew_days"),
    ("tls.yml", {"vnc_tls_ca_cert_file": "/nonexistent/ca-cert.pem"},
     "vnc_tls_ca_cert_file and vnc_tls_ca_key_file go together"),
])
def test_wrong_variables_fail_at_start(fresh_site: Site, role_playbook, bad, message):
    before = fresh_site.configuration()
    proc, counts = fresh_site.playbook({**fresh_site.role_vars, **bad}, playbook=role_playbook)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert counts.get("changed") == 0
    assert fresh_site.configuration() == before


def test_a_ca_key_that_is_not_the_ca_certificates_fails_at_start(fresh_site: Site, tmp_path):
    cert = certtool_ca(tmp_path / "wrong-a", "Operator CA")[0]
    other_key = certtool_ca(tmp_path / "wrong-b", "Another CA")[1]
    before = fresh_site.configuration()
    proc, counts = fresh_site.playbook({**fresh_site.role_vars, "vnc_tls_ca_cert_file": str(cert),
                                        "vnc_tls_ca_key_file": str(other_key)}, playbook="tls.yml")
    assert proc.returncode != 0
    assert "is not the private key of the CA certificate" in proc.stdout
    assert counts.get("changed") == 0
    assert fresh_site.configuration() == before


# -- check mode, a first run, a second run ---------------------------------------------------------
def test_check_mode_reports_changes_and_changes_nothing(fresh_site: Site):
    before = fresh_site.configuration()
    pid = fresh_site.system.pid()
    proc, counts = fresh_site.playbook(fresh_site.role_vars, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] > 0
    assert "Set the VNC TLS keys in qemu.conf" in proc.stdout
    assert fresh_site.configuration() == before
    assert fresh_site.system.pid() == pid


def test_check_mode_with_the_operators_ca_on_a_fresh_host_succeeds_and_changes_nothing(fresh_site: Site, tmp_path):
    """The operator's CA exists, the host has no certificate directory yet: check mode must not
    ask for a certificate request from a server key it did not make (issue 12)."""
    ca_cert, ca_key = certtool_ca(tmp_path / "operator-ca", "Operator CA, check mode")
    before = fresh_site.configuration()
    proc, counts = fresh_site.playbook({**fresh_site.role_vars, "vnc_tls_ca_cert_file": str(ca_cert),
                                        "vnc_tls_ca_key_file": str(ca_key)}, "--check", playbook="tls.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] > 0
    assert fresh_site.configuration() == before


def test_first_run_configures_the_host_and_restarts_libvirtd(configured_site: Site):
    first = configured_site.first_run
    assert first is not None
    assert first.counts["changed"] > 0
    output = first.proc.stdout + first.proc.stderr
    for password in PASSWORDS.values():
        assert password not in output
    # One restart for both roles, through the pidfile (no systemd here).
    assert first.pid_after not in (None, first.pid_before)
    assert first.proc.stdout.count("Restart libvirtd for the VNC") == 2
    assert re.search(r'"pid_after": \d+', first.proc.stdout)

    conf = first.qemu_conf
    assert conf.startswith(BASE_QEMU_CONF + "# Operator's settings")
    for line in ("max_files = 4096", "#vnc_tls = 1", "#vnc_sasl = 1", "vnc_tls = 1",
                 'vnc_listen = "127.0.0.1"', 'vnc_tls_x509_cert_dir = "/etc/pki/libvirt-vnc"',
                 "vnc_tls_x509_verify = 1", "vnc_sasl = 1", 'vnc_sasl_dir = "/etc/sasl2"'):
        assert line in conf.splitlines(), line
    assert "vnc_tls_x509_verify = 0" not in conf
    lines = conf.splitlines()  # a key that was only commented out is set right below it
    assert lines.index("#vnc_tls = 1") + 1 == lines.index("vnc_tls = 1")
    assert lines.index("#vnc_sasl = 1") + 1 == lines.index("vnc_sasl = 1")

    for path, mode in ((CERT_DIR, 0o750), (f"{CERT_DIR}/server-key.pem", 0o640),
                       (SASLDB, 0o640), (f"{SASL_DIR}/qemu.conf", 0o640)):
        assert first.modes[path] == (mode, 0, first.qemu_gid), path
    assert "mech_list: scram-sha-256" in first.sasl_conf
    assert first.sasl_users == set(PASSWORDS)

    # Every address of the host, loopback included.
    names = first.subject_alt_names
    assert {"IP:127.0.0.1", "IP:::1", "DNS:localhost", f"IP:{configured_site.system.host.address}"} <= names
    assert first.host_addresses <= names
    assert first.client_cert_issued


def test_second_run_changes_nothing(configured: Site):
    pid = configured.system.pid()
    proc, counts = configured.playbook(configured.role_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] == 0, proc.stdout
    proc, counts = configured.playbook(configured.role_vars, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] == 0, proc.stdout
    assert configured.system.pid() == pid


# -- a real client's identities reach the graphics event ---------------------------------------------
def test_tls_client_and_sasl_user_appear_in_the_graphics_event(configured: Site, client: ConsoleClient):
    install_issued_identity(client, configured.controller / "ca" / "clients" / OPERATOR)
    with running_domain(configured, "tls") as domain:
        witness = EventWitness(configured.system.uri, domain.name)
        status, output = console_session(configured, client, domain, PASSWORDS[SASL_USER])
        # Refused, it exits by itself (capture raises if it has to be killed).
        bad_status = console_session(configured, client, domain, "wrong password")[0]
        events = [e for e in events_of(witness.stop(disconnects=2)) if e["domain"] == domain.name]
    assert status == 0, output
    assert bad_status != 0
    initialize = [e for e in events if e["phase"] == "initialize"]
    assert len(initialize) == 1, events
    assert initialize[0]["auth"] == "vencrypt+x509+sasl"
    assert initialize[0]["x509dname"] == f"CN={OPERATOR},O=Virtguard Tests"
    assert initialize[0]["saslUsername"] == SASL_USER
    # The failed login: connect and disconnect, no identity.
    assert [e["phase"] for e in events].count("connect") == 2


def test_a_new_ca_reaches_the_running_domain_without_restarting_it(changeable: Site, client: ConsoleClient,
                                                                   tmp_path):
    site = changeable
    ca_cert, ca_key = certtool_ca(tmp_path / "operator-ca", "Operator CA, second")
    new_vars = {
        **site.role_vars,
        "vnc_tls_ca_cert_file": str(ca_cert),
        "vnc_tls_ca_key_file": str(ca_key),
        "vnc_tls_client_cert_dir": str(tmp_path / "operator-clients"),
        "vnc_tls_reload_running_domains": True,
        "vnc_sasl_users": [{"name": SASL_USER, "password": PASSWORDS[SASL_USER]},
                           {"name": GONE_USER, "state": "absent"}],
    }
    with running_domain(site, "reload") as domain:
        old_server_cert = site.path(f"{CERT_DIR}/server-cert.pem").read_bytes()
        pid = site.system.pid()
        proc, counts = site.playbook(new_vars)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert counts["changed"] > 0
        assert site.path(f"{CERT_DIR}/server-cert.pem").read_bytes() != old_server_cert
        assert site.path(f"{CERT_DIR}/ca-cert.pem").read_bytes() == ca_cert.read_bytes()
        assert site.system.pid() == pid  # qemu.conf did not change: no restart
        assert "Reload the VNC certificates of running domains" in proc.stdout
        assert sasl_users(site) == {SASL_USER}

        proc, counts = site.playbook(new_vars)
        assert counts["changed"] == 0, proc.stdout

        # The running domain now serves the new certificate and trusts the new CA's clients.
        install_issued_identity(client, tmp_path / "operator-clients" / OPERATOR)
        witness = EventWitness(site.system.uri, domain.name)
        status, output = console_session(site, client, domain, PASSWORDS[SASL_USER])
        events = [e for e in events_of(witness.stop(disconnects=1))
                  if e["domain"] == domain.name and e["phase"] == "initialize"]
    assert status == 0, output
    assert events and events[-1]["saslUsername"] == SASL_USER
    assert events[-1]["x509dname"] == f"CN={OPERATOR},O=Virtguard Tests"


def test_a_certificate_near_expiry_is_renewed_and_passwords_updated_on_request(changeable: Site):
    site = changeable
    old = site.path(f"{CERT_DIR}/server-cert.pem").read_bytes()
    # Every certificate the role issues (365 days) expires within 400 days.
    proc, counts = site.playbook({**site.role_vars, "vnc_tls_renew_days": 400, "vnc_sasl_update_password": "always"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert site.path(f"{CERT_DIR}/server-cert.pem").read_bytes() != old
    report = proc.stdout.split("Report the SASL users that changed", 1)[1].split("TASK", 1)[0]
    assert SASL_USER in report and GONE_USER in report
    proc, counts = site.playbook(site.role_vars)
    assert counts["changed"] == 0, proc.stdout
