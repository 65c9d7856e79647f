"""The vnc_tls and vnc_sasl roles against this machine's real system libvirtd.

One module-scoped system daemon (started here, restarted by the roles, stopped at the end) and
one domain, because a system domain takes about 44 s to start here. The tests run in order:
wrong inputs fail at start; check mode changes nothing; a real run configures the host and
restarts libvirtd; a second run changes nothing; a real TLS + SASL client (gvnccapture) gets
its certificate subject and SASL user name into the graphics event; a new CA and renewed
certificates reach the running domain without restarting it (display-reload).

Everything under /etc the roles touch is backed up and restored, names carry this run's
prefix, and the CA lives in a temporary directory standing in for the controller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from lab.hypervisor import PREFIX, run
from lab.system_libvirtd import (
    BASE_QEMU_CONF,
    QEMU_CONF,
    GraphicsEventWitness,
    SystemLibvirtd,
    TlsSaslConsoleClient,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="configures the system libvirtd: needs root"),
    pytest.mark.skipif(shutil.which("gvnccapture") is None, reason="hacking/bootstrap.sh not run"),
]

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = Path(__file__).resolve().parent / "host_roles"
CERT_DIR = Path("/etc/pki/libvirt-vnc")
SASL_DIR = Path("/etc/sasl2")
SASLDB = SASL_DIR / "qemu-vnc.sasldb"

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


def playbook_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "build" / "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
    })
    return env


class Playbook:
    """ansible-playbook on site.yml with the role variables as extra vars (a 0600 file)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def run(self, variables: dict, *extra: str,
            playbook: str = "site.yml") -> tuple[subprocess.CompletedProcess, dict]:
        vars_file = self.workdir / "vars.json"
        vars_file.touch(mode=0o600)
        vars_file.write_text(json.dumps(variables))
        proc = subprocess.run(
            [str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(PLAYBOOKS / "inventory.ini"),
             str(PLAYBOOKS / playbook), "-e", f"@{vars_file}", *extra],
            capture_output=True, text=True, env=playbook_env(), cwd=self.workdir, timeout=300, check=False)
        return proc, recap(proc.stdout)


def recap(output: str) -> dict:
    match = re.search(r"^localhost\s*:\s*(.*)$", output, re.M)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))} if match else {}


def snapshot(*paths: Path) -> dict[str, tuple]:
    """Content, mode and owner of every file under the paths (None for a missing path)."""
    state: dict[str, tuple] = {}
    for top in paths:
        if not top.exists():
            state[str(top)] = None
            continue
        for path in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            state[str(path)] = (digest, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return state


def certtool_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A CA made outside the roles, as an operator's PKI would (gnutls certtool)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, template = directory / "ca-key.pem", directory / "ca-cert.pem", directory / "ca.info"
    template.write_text(f"cn = {name}\nca\ncert_signing_key\nexpiration_days = 30\n")
    run(["certtool", "--generate-privkey", "--outfile", str(key)])
    run(["certtool", "--generate-self-signed", "--load-privkey", str(key),
         "--template", str(template), "--outfile", str(cert)])
    return cert, key


def sasl_users() -> set[str]:
    out = run(["sasldblistusers2", "-f", str(SASLDB)]).stdout
    return {line.split("@", 1)[0] for line in out.splitlines() if "@" in line}


def host_addresses() -> set[str]:
    """The host's addresses as the role names them (loopback aside), from ip(8)."""
    found = set()
    for link in json.loads(run(["ip", "-j", "addr", "show"]).stdout):
        for info in link.get("addr_info", []):
            if info.get("local") not in (None, "127.0.0.1", "::1"):
                found.add("IP:" + info["local"])
    return found


def subject_alt_names(cert: Path) -> set[str]:
    from cryptography import x509

    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    ext = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ({f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)}
            | {f"IP:{a}" for a in ext.get_values_for_type(x509.IPAddress)})


def events_of(output: str) -> list[dict]:
    """virsh event lines: one dict per event with its phase and identity lines."""
    events: list[dict] = []
    for line in output.splitlines():
        match = re.match(r"event 'graphics' for domain '([^']+)': (\w+) .* (\S+)$", line)
        if match:
            events.append({"domain": match[1], "phase": match[2], "auth": match[3]})
        elif events and "=" in line and line.startswith("\t"):
            key, _eq, value = line.strip().partition("=")
            events[-1][key] = value
    return events


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def system():
    daemon = SystemLibvirtd(extra_qemu_conf=OPERATOR_QEMU_CONF)
    for path in (CERT_DIR, SASL_DIR):
        daemon.backup.save(path)
    try:
        daemon.start()
    except RuntimeError as exc:  # a system libvirtd that is not ours runs: leave it alone
        pytest.skip(str(exc))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def controller():
    """A directory standing in for the controller's own files (CA, client certificates)."""
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-controller-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def playbook(controller):
    return Playbook(controller)


@pytest.fixture(scope="module")
def passwords():
    return {SASL_USER: secrets.token_urlsafe(12), GONE_USER: secrets.token_urlsafe(12)}


@pytest.fixture(scope="module")
def role_vars(controller, passwords):
    return {
        "vnc_tls_listen": "127.0.0.1",
        "vnc_tls_ca_dir": str(controller / "ca"),
        "vnc_tls_key_size": 2048,
        "vnc_tls_client_certs": [{"name": OPERATOR, "subject": {"O": "Virtguard Tests"}}],
        "vnc_sasl_users": [{"name": name, "password": pw} for name, pw in passwords.items()],
    }


@pytest.fixture(scope="module")
def client():
    console_client = TlsSaslConsoleClient("c")
    yield console_client
    console_client.remove()


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
def test_wrong_variables_fail_at_start(system, playbook, role_vars, role_playbook, bad, message):
    before = snapshot(QEMU_CONF, CERT_DIR, SASL_DIR)
    proc, counts = playbook.run({**role_vars, **bad}, playbook=role_playbook)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert counts.get("changed") == 0
    assert snapshot(QEMU_CONF, CERT_DIR, SASL_DIR) == before


def test_a_ca_key_that_is_not_the_ca_certificates_fails_at_start(system, playbook, role_vars,
                                                                 controller):
    cert = certtool_ca(controller / "wrong-a", "Operator CA")[0]
    other_key = certtool_ca(controller / "wrong-b", "Another CA")[1]
    before = snapshot(QEMU_CONF, CERT_DIR, SASL_DIR)
    proc, counts = playbook.run({**role_vars, "vnc_tls_ca_cert_file": str(cert),
                                 "vnc_tls_ca_key_file": str(other_key)}, playbook="tls.yml")
    assert proc.returncode != 0
    assert "is not the private key of the CA certificate" in proc.stdout
    assert counts.get("changed") == 0
    assert snapshot(QEMU_CONF, CERT_DIR, SASL_DIR) == before


# -- check mode, a real run, a second run ----------------------------------------------------------
def test_check_mode_reports_changes_and_changes_nothing(system, playbook, role_vars, controller):
    before = snapshot(QEMU_CONF, CERT_DIR, SASL_DIR, controller / "ca")
    pid = system.pid()
    proc, counts = playbook.run(role_vars, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] > 0
    assert "Set the VNC TLS keys in qemu.conf" in proc.stdout
    assert snapshot(QEMU_CONF, CERT_DIR, SASL_DIR, controller / "ca") == before
    assert system.pid() == pid


def test_first_run_configures_the_host_and_restarts_libvirtd(
        system, playbook, role_vars, controller, passwords):
    pid = system.pid()
    addresses_before = host_addresses()
    proc, counts = playbook.run(role_vars, "-v")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] > 0
    for password in passwords.values():
        assert password not in proc.stdout + proc.stderr
    # One restart for both roles, through the pidfile (no systemd here).
    assert system.pid() not in (None, pid)
    assert proc.stdout.count("Restart libvirtd for the VNC") == 2
    assert re.search(r'"pid_after": \d+', proc.stdout)

    conf = QEMU_CONF.read_text()
    assert conf.startswith(BASE_QEMU_CONF + "# Operator's settings")
    for line in ("max_files = 4096", "#vnc_tls = 1", "#vnc_sasl = 1", "vnc_tls = 1",
                 'vnc_listen = "127.0.0.1"', 'vnc_tls_x509_cert_dir = "/etc/pki/libvirt-vnc"',
                 "vnc_tls_x509_verify = 1", "vnc_sasl = 1", 'vnc_sasl_dir = "/etc/sasl2"'):
        assert line in conf.splitlines(), line
    assert "vnc_tls_x509_verify = 0" not in conf
    lines = conf.splitlines()  # a key that was only commented out is set right below it
    assert lines.index("#vnc_tls = 1") + 1 == lines.index("vnc_tls = 1")
    assert lines.index("#vnc_sasl = 1") + 1 == lines.index("vnc_sasl = 1")

    qemu_gid = run(["getent", "group", "libvirt-qemu"]).stdout.split(":")[2]
    for path, mode in ((CERT_DIR, 0o750), (CERT_DIR / "server-key.pem", 0o640),
                       (SASLDB, 0o640), (SASL_DIR / "qemu.conf", 0o640)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, int(qemu_gid)), path
    assert "mech_list: scram-sha-256" in (SASL_DIR / "qemu.conf").read_text()
    assert sasl_users() == set(passwords)

    # Every address the host had (other suites add and remove interfaces meanwhile), loopback
    # included; the later runs name the same ones so that they compare like with like.
    names = subject_alt_names(CERT_DIR / "server-cert.pem")
    assert {"IP:127.0.0.1", "IP:::1", "DNS:localhost"} <= names
    assert addresses_before & host_addresses() <= names
    role_vars["vnc_tls_server_addresses"] = sorted(
        name[3:] for name in names if name.startswith("IP:")
        and name not in ("IP:127.0.0.1", "IP:::1"))
    assert (controller / "ca" / "clients" / OPERATOR / "clientcert.pem").exists()


def test_second_run_changes_nothing(system, playbook, role_vars):
    pid = system.pid()
    proc, counts = playbook.run(role_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] == 0, proc.stdout
    proc, counts = playbook.run(role_vars, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] == 0, proc.stdout
    assert system.pid() == pid


# -- a real client's identities reach the graphics event ---------------------------------------------
@pytest.fixture(scope="module")
def domain(system):
    return system.create_domain(f"{PREFIX}-tls")


def test_tls_client_and_sasl_user_appear_in_the_graphics_event(system, domain, client,
                                                               controller, passwords):
    issued = controller / "ca" / "clients" / OPERATOR
    client.install_identity(issued / "cacert.pem", issued / "clientcert.pem",
                            issued / "clientkey.pem")
    witness = GraphicsEventWitness(domain.name)
    status, output = client.capture("127.0.0.1", domain.vnc_port, SASL_USER, passwords[SASL_USER])
    # Refused, it exits by itself (capture raises if it has to be killed).
    bad_status = client.capture("127.0.0.1", domain.vnc_port, SASL_USER, "wrong password")[0]
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


def test_a_new_ca_reaches_the_running_domain_without_restarting_it(system, domain, client,
                                                                   playbook, role_vars,
                                                                   controller, passwords):
    ca_cert, ca_key = certtool_ca(controller / "operator-ca", "Operator CA, second")
    old_server_cert = (CERT_DIR / "server-cert.pem").read_bytes()
    new_vars = {
        **role_vars,
        "vnc_tls_ca_cert_file": str(ca_cert),
        "vnc_tls_ca_key_file": str(ca_key),
        "vnc_tls_client_cert_dir": str(controller / "operator-clients"),
        "vnc_tls_reload_running_domains": True,
        "vnc_sasl_users": [{"name": SASL_USER, "password": passwords[SASL_USER]},
                           {"name": GONE_USER, "state": "absent"}],
    }
    pid = system.pid()
    proc, counts = playbook.run(new_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert counts["changed"] > 0
    assert (CERT_DIR / "server-cert.pem").read_bytes() != old_server_cert
    assert (CERT_DIR / "ca-cert.pem").read_bytes() == ca_cert.read_bytes()
    assert system.pid() == pid  # qemu.conf did not change: no restart
    assert "Reload the VNC certificates of running domains" in proc.stdout
    assert sasl_users() == {SASL_USER}

    proc, counts = playbook.run(new_vars)
    assert counts["changed"] == 0, proc.stdout

    # The running domain now serves the new certificate and trusts the new CA's clients.
    issued = controller / "operator-clients" / OPERATOR
    client.install_identity(issued / "cacert.pem", issued / "clientcert.pem",
                            issued / "clientkey.pem")
    witness = GraphicsEventWitness(domain.name)
    status, output = client.capture("127.0.0.1", domain.vnc_port, SASL_USER, passwords[SASL_USER])
    events = [e for e in events_of(witness.stop(disconnects=1))
              if e["domain"] == domain.name and e["phase"] == "initialize"]
    assert status == 0, output
    assert events and events[-1]["saslUsername"] == SASL_USER
    assert events[-1]["x509dname"] == f"CN={OPERATOR},O=Virtguard Tests"


def test_a_certificate_near_expiry_is_renewed_and_passwords_updated_on_request(
        system, playbook, role_vars):
    old = (CERT_DIR / "server-cert.pem").read_bytes()
    # Every certificate the role issues (365 days) expires within 400 days.
    proc, counts = playbook.run({**role_vars, "vnc_tls_renew_days": 400,
                                 "vnc_sasl_update_password": "always"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (CERT_DIR / "server-cert.pem").read_bytes() != old
    report = proc.stdout.split("Report the SASL users that changed", 1)[1].split("TASK", 1)[0]
    assert SASL_USER in report and GONE_USER in report
    proc, counts = playbook.run(role_vars)
    assert counts["changed"] == 0, proc.stdout
