"""TLS + SASL consoles for the lab: a throwaway CA, a server certificate with IP SANs, client
certificates with any subject (hostile ones included), a sasldb, the qemu.conf keys that turn
VNC TLS (x509verify) and SASL (SCRAM-SHA-256) on for a session daemon, and the real client
``gvnccapture`` run as a unix user of its own (it reads its certificates from the passwd home
of the user it runs as), in a network namespace if asked, answering its prompts on a pty.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pty
import pwd
import select
import shutil
import signal
import tempfile
import termios
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lab.hypervisor import PREFIX, create_user, delete_user, run


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject, issuer, key, issuer_key, ca=False, sans=None, client=False):
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [x509.OID_CLIENT_AUTH if client else x509.OID_SERVER_AUTH]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class TlsSaslLab:
    """Everything a TLS + SASL console needs, under ``base`` (which the daemon's user must
    be able to read: put it inside the hypervisor's directory before ``start()``)."""

    def __init__(self, base: Path, server_ips: list[str]):
        self.base = Path(base)
        self.pki = self.base / "pki"
        self.sasl = self.base / "sasl"
        self.sasldb = self.sasl / "passwd.db"
        self.server_ips = server_ips
        self.users: list[str] = []
        # client homes apart from ``base``: the daemon's directory is private to its user
        self.homes = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-homes-"))
        os.chmod(self.homes, 0o755)
        for path in (self.pki, self.sasl):
            path.mkdir(parents=True, exist_ok=True)
        self.ca_key = _key()
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{PREFIX} lab CA")])
        self.ca_pem = _cert(self.ca_name, self.ca_name, self.ca_key, self.ca_key, ca=True)
        (self.pki / "ca-cert.pem").write_bytes(self.ca_pem)
        server_key = _key()
        sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab-console")])
        (self.pki / "server-cert.pem").write_bytes(
            _cert(server_name, self.ca_name, server_key, self.ca_key, sans=sans))
        (self.pki / "server-key.pem").write_bytes(_pem_key(server_key))
        (self.sasl / "qemu.conf").write_text(f"mech_list: scram-sha-256\nsasldb_path: {self.sasldb}\n")

    def qemu_conf(self) -> str:
        return (f'vnc_listen = "0.0.0.0"\nvnc_tls = 1\nvnc_tls_x509_cert_dir = "{self.pki}"\n'
                f'vnc_tls_x509_verify = 1\nvnc_sasl = 1\nvnc_sasl_dir = "{self.sasl}"\n')

    def add_sasl_user(self, name: str, password: str) -> None:
        run(["saslpasswd2", "-p", "-c", "-a", "qemu", "-f", str(self.sasldb), name], input=password)

    def client(self, tag: str, common_name: str, organization: str = "virtguard lab") -> ConsoleClient:
        """A unix user whose gvnccapture presents a certificate for ``CN=common_name``."""
        console_client = ConsoleClient.create(tag, self.homes)
        self.users.append(console_client.user)
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        console_client.install_identity(self.ca_pem, _cert(name, self.ca_name, key, self.ca_key, client=True),
                                        _pem_key(key))
        return console_client

    def cleanup(self) -> None:
        for user in self.users:
            delete_user(user)
        self.users = []
        shutil.rmtree(self.homes, ignore_errors=True)


def run_gvnccapture(user: str, target: str, shot: Path, username: str, password: str,
                    netns: str | None = None, timeout: float = 30) -> tuple[int, str]:
    """One whole session of gvnccapture as ``user`` (connect to ``target``, HOST:DISPLAY, TLS,
    SASL, first frame saved to ``shot``, disconnect), in the network namespace ``netns`` if
    given; returns its exit status and what it printed (the password masked).

    gvnccapture prints its password prompt, then turns the terminal's echo off with TCSAFLUSH,
    which throws away whatever was typed in between: the password is typed only once echo is
    off (the pty master reports the terminal's modes). A gvnccapture still running after
    ``timeout`` is killed and reported as an error (TimeoutError), never as a status."""
    command = ["runuser", "-u", user, "--", "gvnccapture",
               *(["-d"] if os.environ.get("VGT_GVNC_DEBUG") else []), target, str(shot)]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    pid, fd = pty.fork()
    if pid == 0:  # the child: nothing but exec
        os.execvp(command[0], command)
    output, answered = b"", set()
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            if time.monotonic() >= deadline:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            lowered = output.lower()
            if b"username:" in lowered and "user" not in answered:
                os.write(fd, username.encode() + b"\n")
                answered.add("user")
            if (b"password:" in lowered and "password" not in answered
                    and not termios.tcgetattr(fd)[3] & termios.ECHO):
                os.write(fd, password.encode() + b"\n")
                answered.add("password")
            waiting_for_echo_off = b"password:" in lowered and "password" not in answered
            if not select.select([fd], [], [], 0.02 if waiting_for_echo_off else 0.5)[0]:
                continue
            try:
                data = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        os.close(fd)
    text = output.decode(errors="replace").replace(password, "<password>")
    if timed_out:
        raise TimeoutError(f"gvnccapture {target} still running after {timeout:g}s (killed); it printed:\n{text}")
    return status, text


class ConsoleClient:
    """gvnccapture under a unix user of its own, holding one client identity: it reads
    ``~/.pki`` from its passwd home (not $HOME), and the SASL user name and password from a
    terminal, so it runs on a pty."""

    def __init__(self, user: str, home: Path) -> None:
        self.user = user
        self.home = home

    @classmethod
    def create(cls, tag: str, homes: Path) -> ConsoleClient:
        """A new unix user (per-process name), its home in ``homes`` (which the user must be
        able to traverse); ``remove()`` deletes it."""
        user = f"{PREFIX}{tag}"[:31]
        home = homes / user
        try:
            pwd.getpwnam(user)
        except KeyError:
            create_user(user, home=str(home), groups="users")
        home.mkdir(parents=True, exist_ok=True)
        shutil.chown(home, user)
        return cls(user, home)

    def install_identity(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
        """The CA certificate it trusts, and its client certificate and key (replacing any)."""
        pki = self.home / ".pki"
        shutil.rmtree(pki, ignore_errors=True)
        for sub, content, mode in (("CA/cacert.pem", ca_pem, 0o644),
                                   ("gvnccapture/clientcert.pem", cert_pem, 0o644),
                                   ("gvnccapture/private/clientkey.pem", key_pem, 0o600)):
            target = pki / sub
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            os.chmod(target, mode)
        for path in [pki, *pki.rglob("*")]:
            shutil.chown(path, self.user)

    def capture(self, netns_name: str | None, host: str, display: int, username: str, password: str,
                timeout: float = 30) -> tuple[int, str]:
        """One whole session (run_gvnccapture) to ``host:display`` from the network namespace
        ``netns_name`` (None: this one); gvnccapture's exit status and what it printed."""
        return run_gvnccapture(self.user, f"{host}:{display}", self.home / "capture.png", username, password,
                               netns=netns_name, timeout=timeout)

    def remove(self) -> None:
        delete_user(self.user)
        shutil.rmtree(self.home, ignore_errors=True)
