"""TLS + SASL consoles for the lab: a throwaway CA, a server certificate with IP SANs, client
certificates with any subject (hostile ones included), a sasldb, the qemu.conf keys that turn
VNC TLS (x509verify) and SASL (SCRAM-SHA-256) on for a session daemon, and the real client
``gvnccapture`` run as a unix user of its own (it reads its certificates from the passwd home
of the user it runs as) inside a network namespace, answering its prompts on a pty.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pty
import pwd
import select
import shutil
import tempfile
import termios
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lab.hypervisor import PREFIX, create_user, delete_user, run


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject, issuer, key, issuer_key, ca=False, sans=None, client=False):
    now = datetime.datetime.now(datetime.timezone.utc)
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

    def make_readable_by(self, user: str) -> None:
        for path in [self.base, *self.base.rglob("*")]:
            shutil.chown(path, user)

    def client(self, tag: str, common_name: str, organization: str = "virtguard lab") -> "ConsoleClient":
        """A unix user whose gvnccapture presents a certificate for ``CN=common_name``."""
        user = f"{PREFIX}{tag}"[:31]
        home = self.homes / user
        try:
            pwd.getpwnam(user)
        except KeyError:
            create_user(user, home=str(home), groups="users")
            self.users.append(user)
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        (home / ".pki" / "CA").mkdir(parents=True, exist_ok=True)
        (home / ".pki" / "gvnccapture" / "private").mkdir(parents=True, exist_ok=True)
        (home / ".pki" / "CA" / "cacert.pem").write_bytes(self.ca_pem)
        (home / ".pki" / "gvnccapture" / "clientcert.pem").write_bytes(
            _cert(name, self.ca_name, key, self.ca_key, client=True))
        (home / ".pki" / "gvnccapture" / "private" / "clientkey.pem").write_bytes(_pem_key(key))
        for path in [home, *home.rglob("*")]:
            shutil.chown(path, user)
        os.chmod(home / ".pki" / "gvnccapture" / "private" / "clientkey.pem", 0o600)
        return ConsoleClient(user, home, name.rfc4514_string())

    def cleanup(self) -> None:
        for user in self.users:
            delete_user(user)
        self.users = []
        shutil.rmtree(self.homes, ignore_errors=True)


def _wait_for_echo_off(fd: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


class ConsoleClient:
    def __init__(self, user: str, home: Path, dname: str):
        self.user = user
        self.home = home
        self.dname = dname  # RFC 4514, most significant last as OpenSSL/GnuTLS print it varies

    def capture(self, netns_name: str, host: str, display: int, username: str, password: str,
                timeout: float = 30) -> tuple[int, str]:
        """One whole session with gvnccapture (connect, TLS, SASL, first frame, disconnect).

        Returns gvnccapture's exit status and what it printed."""
        out_file = self.home / "capture.png"
        pid, fd = pty.fork()
        if pid == 0:  # child: the pty is its terminal
            os.execvp("ip", ["ip", "netns", "exec", netns_name, "runuser", "-u", self.user, "--",
                             "gvnccapture", *(["-d"] if os.environ.get("VGT_GVNC_DEBUG") else []), f"{host}:{display}", str(out_file)])
        output = b""
        answered = set()
        deadline = time.monotonic() + timeout
        status = None
        try:
            while time.monotonic() < deadline:
                ready = select.select([fd], [], [], 0.2)[0]
                if ready:
                    try:
                        chunk = os.read(fd, 4096)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        break
                    output += chunk
                    lower = output.lower()
                    if b"username" in lower and "user" not in answered:
                        answered.add("user")
                        os.write(fd, username.encode() + b"\n")
                    if b"password" in lower and "password" not in answered:
                        answered.add("password")
                        # it turns echo off and flushes pending input after printing the
                        # prompt: a password typed before that would be thrown away
                        _wait_for_echo_off(fd)
                        os.write(fd, password.encode() + b"\n")
                done, waited = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = waited
                    break
        finally:
            if status is None:
                if time.monotonic() >= deadline:
                    os.kill(pid, 9)
                status = os.waitpid(pid, 0)[1]
            os.close(fd)
        return os.waitstatus_to_exitcode(status), output.decode(errors="replace")
