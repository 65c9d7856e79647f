"""The test lab as a fleet: hypervisor hosts of their own on this machine, each reached as a
remote hypervisor would be (``qemu+tls://ADDR/system``, ``qemu+ssh://root@ADDR/system``,
Ansible over SSH).

A ``FleetHost`` is
- a network namespace joined to the machine by a veth pair, on a /30 of its own (the host is
  ``address``, the machine's end ``gateway``), inside a /20 of 10.200.0.0/13 that depends on
  the process id (lab.netns's clients use 100.64.0.0/10);
- a private mount and UTS namespace with its own hostname, its own /etc (a copy of the
  machine's, with empty /etc/libvirt, /etc/pki and /etc/sasl2, its own /etc/hosts) and empty directories of
  its own over /run, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt (the rest of the
  machine's file system, /usr/bin/python3 included, is seen as it is). One process holds the
  namespaces (``sleep infinity``); ``run()`` runs a command inside with nsenter;
- inside: ``virtlogd -d``, a system ``libvirtd -d --listen`` with a TLS listener (its own CA and
  server certificate with an IP SAN for ``address``; the client's certificates in ``pkipath``),
  and an sshd that takes the key the harness made (``ssh_key``), for ``qemu+ssh://`` and Ansible.

Console clients live in lab.netns namespaces; ``route_clients_to_fleet(ns)`` lets one reach every
host of this process (through the machine, which forwards between these veths only: forwarding
is switched on per interface, never machine-wide). A host sees the client's own address.

Every name carries the per-process prefix of lab.hypervisor, addresses that another suite holds
are skipped, and ``stop()`` removes everything the host made (daemons, QEMU, namespaces, veth,
mounts, directories), also after a failed start. ``start_hosts()`` starts several in parallel.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from cryptography import x509
from cryptography.x509.oid import NameOID

from lab.hypervisor import DOMAIN_XML, PREFIX, CommandFailed, Domain, run, wait_for
from lab.netns import ClientNamespace
from lab.tls_console import _cert, _key, _pem_key

TLS_PORT = 16514
SSH_PORT = 22
MANAGEMENT_PORTS = (TLS_PORT, SSH_PORT)
PARTITION_TABLE = "vgt_fleet_partition"  # in the host's own netns: one per host, no prefix needed
SLOTS_PER_PROCESS = 1024  # /30 subnets in the process's /20
# The account libvirt's packaged QEMU driver looks up when it starts, even when qemu.conf says
# user = "root" (it fails otherwise: "Failed to parse user 'libvirt-qemu'"). Debian's package makes
# it (uid 64055); a machine without it gets it in the host's own /etc, never in the machine's.
QEMU_ACCOUNT = "libvirt-qemu"
QEMU_ACCOUNT_ID = 64055

# Private directories of a host: the path inside the host -> its directory under the host's root.
# /etc is a copy of the machine's whose /etc/libvirt, /etc/pki and /etc/sasl2 (what the roles own)
# start empty, whatever the machine holds there (a SASL user of its own): the host needs its
# own /etc/hosts and maybe the QEMU account too, and single files bind-mounted over the machine's
# would not do: useradd and userdel (other suites make users all the time) replace /etc/passwd by
# a rename, after which the path leads to the machine's new file, not to the mount.
ROLE_OWNED_ETC = ("libvirt", "pki", "sasl2")
PRIVATE_DIRS = {
    "/etc": "etc",
    "/run": "run",
    "/var/lib/libvirt": "var-lib-libvirt",
    "/var/log/libvirt": "var-log-libvirt",
    "/var/cache/libvirt": "var-cache-libvirt",
}

LIBVIRTD_CONF = """\
listen_tls = 1
listen_tcp = 0
auth_tls = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

# security_driver and namespaces: what any system domain needs on this machine kind (nothing
# relabels files, no private /dev for QEMU). QEMU runs as root: /dev/kvm exists here but is
# ``crw------- root``, so libvirt's capability probe (run as root) finds KVM while the default
# QEMU account (libvirt-qemu) cannot open it; libvirt then judges its capability cache outdated
# at every check ("KVM was enabled when probing ... but it is not available now") and probes
# QEMU again and again during each start: about 44 s a domain instead of 0.5 s.
QEMU_CONF = """\
security_driver = "none"
namespaces = []
vnc_listen = "0.0.0.0"
user = "root"
group = "root"
"""

SSHD_CONFIG = """\
ListenAddress {address}
Port {port}
HostKey {host_key}
PidFile /run/sshd.pid
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
Subsystem sftp /usr/lib/openssh/sftp-server
"""

# What libvirt's ssh transport (the URI's command=) and host.ssh() use: the host's key only, known
# beforehand (no prompt, nothing written to root's ~/.ssh). Ansible gets the same from inventory_vars.
SSH_CLIENT_CONFIG = """\
Host *
  User root
  IdentityFile {key}
  IdentitiesOnly yes
  UserKnownHostsFile {known_hosts}
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
"""

_slots_lock = threading.Lock()
_next_slot = 0
_capabilities_lock = threading.Lock()
_capabilities_seed: Path | None = None  # QEMU capabilities a host of this process probed


def _seed_capabilities(cache: Path) -> None:
    """Give a new host's daemon the QEMU capabilities another host of this process probed, if
    any. libvirt checks a cached entry against what it depends on (QEMU's and libvirtd's
    binaries, the kernel, /dev/kvm), all the same for every host of this machine, so it is
    taken as it is instead of probing QEMU again (some 8 s of a core per host)."""
    with _capabilities_lock:
        if _capabilities_seed is not None:
            shutil.copytree(_capabilities_seed, cache, dirs_exist_ok=True)


def _keep_capabilities(cache: Path) -> None:
    """Keep the capabilities a host's daemon probed, for the hosts started after it."""
    global _capabilities_seed
    with _capabilities_lock:
        if _capabilities_seed is not None or not any(cache.glob("*.xml")):
            return
        seed = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-fleet-capabilities-"))
        shutil.copytree(cache, seed, dirs_exist_ok=True)
        atexit.register(shutil.rmtree, seed, True)
        _capabilities_seed = seed


def fleet_network() -> ipaddress.IPv4Network:
    """This process's /20 for fleet hosts: 10.(200 + pid % 50).(16 * (pid // 50 % 16)).0/20."""
    pid = os.getpid()
    return ipaddress.IPv4Network(f"10.{200 + pid % 50}.{pid // 50 % 16 * 16}.0/20")


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks on the machine's interfaces (another suite's fleet included)."""
    out = run(["ip", "-j", "-4", "addr", "show"]).stdout
    return [ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}").network
            for link in json.loads(out) for info in link.get("addr_info", [])]


def _allocate_slot() -> tuple[int, ipaddress.IPv4Network]:
    """The next /30 of this process's /20 that no interface of the machine overlaps; never the
    same slot twice in a process (an address reused soon could meet a stale SSH master or a
    libvirt connection to the host that held it before)."""
    global _next_slot
    block = fleet_network()
    with _slots_lock:
        in_use = _networks_in_use()
        while _next_slot < SLOTS_PER_PROCESS:
            slot = _next_slot
            _next_slot += 1
            subnet = ipaddress.IPv4Network(f"{block.network_address + 4 * slot}/30")
            if not any(subnet.overlaps(other) for other in in_use):
                return slot, subnet
    raise RuntimeError(f"no free /30 left in {block} for another fleet host")


def _write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    os.chmod(path, mode)


def _pid_from(pidfile: Path, name: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and is ``name`` (a stale file's pid may
    belong to another process by now)."""
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == name else None


def route_clients_to_fleet(ns: ClientNamespace) -> None:
    """Let the client namespace ``ns`` reach every fleet host of this process: a route to the
    fleet's /20 through the machine, which forwards what arrives on ``ns``'s veth (forwarding
    switched on for that interface only; the hosts' veths have it from their start)."""
    ns.run(["ip", "route", "replace", str(fleet_network()), "via", ns.host_ip])
    Path(f"/proc/sys/net/ipv4/conf/{ns.host_link}/forwarding").write_text("1\n")


class FleetHost:
    """``FleetHost(hostname).start()``: a hypervisor host at ``address``; ``stop()`` removes it.

    URIs: ``tls_uri`` (``qemu+tls://ADDR/system?pkipath=DIR``), ``ssh_uri``
    (``qemu+ssh://root@ADDR/system?command=...&no_tty=1``: libvirt's ssh transport through a
    wrapper that gives ssh the host's key and known_hosts), ``local_uri`` (the daemon's unix
    socket, as the machine sees it: for the harness's own virsh). ``timings`` holds what the
    start took (seconds)."""

    def __init__(self, hostname: str | None = None) -> None:
        self.slot, self.subnet = _allocate_slot()
        # a dash, which lab.netns's names (prefix, letters, index) never hold, keeps them apart
        self.name = f"{PREFIX}-h{self.slot}"  # the network namespace
        self.host_link = f"{PREFIX}-m{self.slot}"[:15]  # the machine's end of the veth
        self.ns_link = f"{PREFIX}-n{self.slot}"[:15]
        self.gateway, self.address = str(self.subnet[1]), str(self.subnet[2])
        self.hostname = hostname or self.name
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.pkipath = self.root / "client-pki"
        self.ssh_dir = self.root / "ssh"
        self.ssh_key = self.ssh_dir / "id_ed25519"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.ssh_config = self.ssh_dir / "config"
        self.ssh_command = self.ssh_dir / "ssh"  # ssh with the host's config (libvirt's command=)
        self.tls_uri = f"qemu+tls://{self.address}/system?pkipath={self.pkipath}"
        self.ssh_uri = f"qemu+ssh://root@{self.address}/system?command={self.ssh_command}&no_tty=1"
        self.local_uri = f"qemu+unix:///system?socket={self.path('/run/libvirt/libvirt-sock')}"
        self.holder: subprocess.Popen[str] | None = None
        self.timings: dict[str, float] = {}
        self._partition_timer: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"FleetHost({self.hostname!r} at {self.address}, netns {self.name})"

    # -- start ------------------------------------------------------------------------------
    def start(self) -> FleetHost:
        began = time.monotonic()
        try:
            self._make_network()
            self._make_files()
            self._enter_namespaces()
            self._start_daemons()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - began
        return self

    def _make_network(self) -> None:
        run(["ip", "netns", "add", self.name])
        run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link])
        run(["ip", "link", "set", self.ns_link, "netns", self.name])
        run(["ip", "addr", "add", f"{self.gateway}/30", "dev", self.host_link])
        run(["ip", "link", "set", self.host_link, "up"])
        # the host answers clients of other namespaces through the machine (route_clients_to_fleet)
        Path(f"/proc/sys/net/ipv4/conf/{self.host_link}/forwarding").write_text("1\n")
        for cmd in (["ip", "addr", "add", f"{self.address}/30", "dev", self.ns_link],
                    ["ip", "link", "set", self.ns_link, "up"],
                    ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "default", "via", self.gateway]):
            run(["ip", "netns", "exec", self.name, *cmd])

    def _make_files(self) -> None:
        os.chmod(self.root, 0o700)
        self._copy_etc()
        for directory in PRIVATE_DIRS.values():
            (self.root / directory).mkdir(exist_ok=True)
        self._make_etc_files()
        _write(self.path("/etc/libvirt/libvirtd.conf"), LIBVIRTD_CONF)
        _write(self.path("/etc/libvirt/qemu.conf"), QEMU_CONF, 0o600)
        self._make_certificates()
        self._make_ssh_files()

    def _copy_etc(self, attempts: int = 5) -> None:
        """The machine's /etc, copied. Other suites on this machine add and remove files there
        all the time (useradd's lock and backup files, a role's directories), and ``cp -a`` fails
        on a file that vanished between its listing and its copy: copy again."""
        target = self.root / "etc"
        for attempt in range(attempts):
            copied = run(["cp", "-a", "/etc", str(target)], check=False)
            if copied.returncode == 0:
                return
            shutil.rmtree(target, ignore_errors=True)
            if attempt + 1 == attempts:
                raise CommandFailed(copied.returncode, copied.args, copied.stdout, copied.stderr)
            time.sleep(0.2)

    def _make_etc_files(self) -> None:
        """The host's own /etc (a copy of the machine's): empty /etc/libvirt, /etc/pki and /etc/sasl2
        (the roles' directories: a fresh host has nothing of them, whatever this machine has), an
        /etc/hosts that names the host (libvirt resolves its own hostname at every domain start
        and for getHostname; unresolved, each lookup waits 10 s for a DNS server the host cannot
        reach), and the QEMU account if the machine has none (see QEMU_ACCOUNT)."""
        etc = self.root / "etc"
        for empty in ROLE_OWNED_ETC:
            shutil.rmtree(etc / empty, ignore_errors=True)
            (etc / empty).mkdir(mode=0o755)
        _write(etc / "hosts", f"127.0.0.1 localhost\n::1 localhost\n{self.address} {self.hostname}\n")
        for name, entry in (("passwd", f"{QEMU_ACCOUNT}:x:{QEMU_ACCOUNT_ID}:{QEMU_ACCOUNT_ID}:Libvirt Qemu:"
                                       "/var/lib/libvirt:/usr/sbin/nologin\n"),
                            ("group", f"{QEMU_ACCOUNT}:x:{QEMU_ACCOUNT_ID}:\n")):
            content = (etc / name).read_text()
            if not any(line.startswith(f"{QEMU_ACCOUNT}:") for line in content.splitlines()):
                (etc / name).write_text(content + ("" if content.endswith("\n") else "\n") + entry)

    def _make_certificates(self) -> None:
        """The host's CA, its server certificate (IP SAN: the address clients dial; libvirt's
        client checks it) where libvirtd looks by default, and one client identity in
        ``pkipath`` (libvirtd verifies client certificates against the CA)."""
        ca_key = _key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} fleet CA")])
        ca_pem = _cert(ca_name, ca_name, ca_key, ca_key, ca=True)
        server_key = _key()
        server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.hostname)])
        server_pem = _cert(server_name, ca_name, server_key, ca_key,
                           sans=[x509.IPAddress(ipaddress.ip_address(self.address))])
        client_key = _key()
        client_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "virtguard lab"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, "fleet-client")])
        client_pem = _cert(client_name, ca_name, client_key, ca_key, client=True)
        _write(self.path("/etc/pki/CA/cacert.pem"), ca_pem)
        _write(self.path("/etc/pki/libvirt/servercert.pem"), server_pem)
        _write(self.path("/etc/pki/libvirt/private/serverkey.pem"), _pem_key(server_key), 0o600)
        _write(self.pkipath / "cacert.pem", ca_pem)
        _write(self.pkipath / "clientcert.pem", client_pem)
        _write(self.pkipath / "clientkey.pem", _pem_key(client_key), 0o600)

    def _make_ssh_files(self) -> None:
        self.ssh_dir.mkdir(mode=0o700)
        host_key = self.ssh_dir / "ssh_host_ed25519_key"
        for key in (host_key, self.ssh_key):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}", "-f", str(key)])
        _write(self.ssh_dir / "authorized_keys", (self.ssh_dir / "id_ed25519.pub").read_text())
        host_public = (self.ssh_dir / "ssh_host_ed25519_key.pub").read_text().split()
        _write(self.known_hosts, f"{self.address} {host_public[0]} {host_public[1]}\n")
        _write(self.ssh_dir / "sshd_config", SSHD_CONFIG.format(
            address=self.address, port=SSH_PORT, host_key=host_key,
            authorized_keys=self.ssh_dir / "authorized_keys"))
        _write(self.ssh_config, SSH_CLIENT_CONFIG.format(key=self.ssh_key, known_hosts=self.known_hosts))
        _write(self.ssh_command, f'#!/bin/sh\nexec ssh -F {shlex.quote(str(self.ssh_config))} "$@"\n', 0o755)
        (self.ssh_dir / "cp").mkdir(mode=0o700)

    def _enter_namespaces(self) -> None:
        """The holder: a process in the host's network namespace that made a mount and UTS
        namespace of its own, mounted the private directories and keeps them while it lives."""
        for mount_point in PRIVATE_DIRS:
            Path(mount_point).mkdir(parents=True, exist_ok=True)  # on the machine: they must exist
        # the libvirt directories stay (empty) on a machine that had none: another host may be
        # using them as mount points meanwhile
        lines = [
            "set -e",
            # The copy of the machine's mount table holds every lab netns mounted under
            # /run/netns (nsfs), which would keep those namespaces alive after ``ip netns
            # delete`` as long as this host lives: let go of them first.
            "umount -l /run/netns 2>/dev/null || true",
            *(f"mount --bind {shlex.quote(str(self.root / d))} {shlex.quote(p)}" for p, d in PRIVATE_DIRS.items()),
            "mkdir -p /run/libvirt /run/sshd",
            f"hostname {shlex.quote(self.hostname)}",
            "echo ready",
            "exec sleep infinity",
        ]
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.name, "unshare", "--mount", "--uts", "--propagation", "private",
             "bash", "-c", "\n".join(lines)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.holder.stdout is not None and self.holder.stderr is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.wait(10)
            raise RuntimeError(f"fleet host {self.name} did not start: {self.holder.stderr.read()}")

    def _start_daemons(self) -> None:
        self.run(["virtlogd", "-d"])
        wait_for(self.path("/run/libvirt/virtlogd-sock").exists, 30, f"virtlogd of {self.name}")
        capabilities = self.path("/var/cache/libvirt/qemu/capabilities")
        _seed_capabilities(capabilities)
        began = time.monotonic()
        self.start_libvirtd()
        self.timings["libvirtd"] = time.monotonic() - began
        _keep_capabilities(capabilities)
        self.run(["/usr/sbin/sshd", "-f", str(self.ssh_dir / "sshd_config"), "-E", str(self.ssh_dir / "sshd.log")])
        wait_for(lambda: self.listening(SSH_PORT), 30, f"sshd of {self.name}")

    # -- inside the host --------------------------------------------------------------------
    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a program inside the host (its namespaces)."""
        assert self.holder is not None, f"fleet host {self.name} is not started"
        return ["nsenter", "--target", str(self.holder.pid), "--mount", "--uts", "--net", "--"]

    def run(self, cmd: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the host (network, mount and UTS namespaces)."""
        return run([*self.enter, *cmd], check=check, **kwargs)

    def path(self, host_path: str | Path) -> Path:
        """Where a file of the host's private directories is on the machine."""
        host_path = Path(host_path)
        for top, directory in PRIVATE_DIRS.items():
            if host_path == Path(top) or Path(top) in host_path.parents:
                return self.root / directory / host_path.relative_to(top)
        raise ValueError(f"{host_path} is the machine's, not the host's own")

    def listening(self, port: int) -> bool:
        out = run(["ip", "netns", "exec", self.name, "ss", "-H", "-l", "-t", "-n", f"sport = :{port}"]).stdout
        return bool(out.strip())

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """virsh on the host's daemon (through its unix socket, as root on the host would)."""
        return run(["virsh", "-q", "-c", self.local_uri, *args], check=check)

    def ssh(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``command`` run on the host over SSH, as Ansible gets there."""
        return run([str(self.ssh_command), self.address, command], check=check)

    # -- libvirtd ---------------------------------------------------------------------------
    def libvirtd_pid(self) -> int | None:
        return _pid_from(self.path("/run/libvirtd.pid"), "libvirtd")

    def start_libvirtd(self, timeout: float = 120) -> None:
        """``libvirtd -d --listen`` inside; returns once it answers on its unix socket and
        listens for TLS."""
        self.run(["libvirtd", "-d", "--listen"])
        try:
            wait_for(lambda: self.virsh("version", check=False).returncode == 0, timeout,
                     f"the system libvirtd of {self.name} to answer")
            wait_for(lambda: self.listening(TLS_PORT), timeout, f"libvirtd of {self.name} to listen for TLS")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; libvirtd pid {self.libvirtd_pid()}; "
                               f"end of its log:\n{self.log_tail()}") from exc

    def log_tail(self, lines: int = 20) -> str:
        """The end of libvirtd's log (warnings and errors)."""
        try:
            text = self.path("/var/log/libvirt/libvirtd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill_libvirtd(self, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """End libvirtd (SIGKILL by default: a crash); QEMU and its clients live on."""
        pid = self.libvirtd_pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout, f"libvirtd of {self.name} to exit")

    # -- domains ----------------------------------------------------------------------------
    def create_domain(self, name: str) -> Domain:
        """A tiny paused domain whose VNC server listens on every address of the host
        (qemu.conf's vnc_listen); ``timings["domain " + name]`` says how long it took."""
        xml = DOMAIN_XML.format(name=escape(name), listen="").replace(" listen=''", "")
        xml_file = self.root / "domains" / f"{name}.xml"
        _write(xml_file, xml)
        began = time.monotonic()
        try:
            self.virsh("create", "--paused", str(xml_file))
        except CommandFailed as exc:
            log = self.path(f"/var/log/libvirt/qemu/{name}.log")
            try:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            except OSError:
                tail = "(none)"
            raise RuntimeError(f"{exc}\nend of {log}:\n{tail}") from exc
        self.timings[f"domain {name}"] = time.monotonic() - began
        display = self.virsh("domdisplay", name).stdout.strip()
        port = 5900 + int(display.rsplit(":", 1)[1])
        uuid = self.virsh("domuuid", name).stdout.strip()
        return Domain(name=name, uuid=uuid, vnc_port=port)

    def query_vnc(self, name: str) -> str:
        return str(self.virsh("qemu-monitor-command", name, '{"execute":"query-vnc"}').stdout)

    # -- management network -----------------------------------------------------------------
    def partition(self, seconds: float | None = None, ports: Iterable[int] = MANAGEMENT_PORTS) -> None:
        """Cut the host off its management network: drop TCP ``ports`` (libvirt's TLS and SSH by
        default) in the host's namespace, in (dport) and out (sport), so that established
        connections go silent rather than being reset. With ``seconds``, ``heal()`` follows by
        itself after that long."""
        port_list = ", ".join(str(int(port)) for port in ports)
        ruleset = (f"table inet {PARTITION_TABLE} {{\n"
                   f"  chain input {{ type filter hook input priority -300; tcp dport {{ {port_list} }} drop; }}\n"
                   f"  chain output {{ type filter hook output priority -300; tcp sport {{ {port_list} }} drop; }}\n"
                   "}\n")
        self.heal()
        run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=ruleset)
        if seconds is not None:
            self._partition_timer = threading.Timer(seconds, self.heal)
            self._partition_timer.daemon = True
            self._partition_timer.start()

    def heal(self) -> None:
        """End a partition (nothing happens when there is none)."""
        timer, self._partition_timer = self._partition_timer, None
        if timer is not None:
            timer.cancel()
        run(["ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", PARTITION_TABLE], check=False)

    def partitioned(self) -> bool:
        return run(["ip", "netns", "exec", self.name, "nft", "list", "table", "inet", PARTITION_TABLE],
                   check=False).returncode == 0

    # -- Ansible ----------------------------------------------------------------------------
    def inventory_vars(self) -> dict[str, str]:
        """Ansible host variables that reach this host over SSH as root. The connection master
        lives in the host's directory: a master left from an earlier host at the same address
        can never be reused."""
        return {
            "ansible_host": self.address,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.ssh_key),
            "ansible_ssh_common_args": (f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                                        "-o IdentitiesOnly=yes"),
            "ansible_ssh_args": f"-o ControlMaster=auto -o ControlPersist=60s -o ControlPath={self.ssh_dir}/cp/%C",
            # the machine's interpreter: the host's mount namespace replaces only PRIVATE_DIRS
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    # -- tear down ----------------------------------------------------------------------------
    def processes(self) -> list[int]:
        """Every process inside the host's mount namespace, the holder aside."""
        if self.holder is None:
            return []
        try:
            namespace = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        except OSError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                        found.append(int(entry))
                except OSError:
                    continue
        return found

    def stop(self) -> None:
        """End every process of the host (SIGTERM, then SIGKILL), the holder, the namespaces,
        the veth pair and the host's directories. Safe to call again, and after a failed start."""
        timer, self._partition_timer = self._partition_timer, None
        if timer is not None:
            timer.cancel()
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.processes():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    wait_for(lambda: not self.processes(), 20, f"the processes of fleet host {self.name} to end")
                    break
                except TimeoutError:
                    continue
        finally:
            if self.holder is not None:
                self.holder.kill()
                self.holder.wait()
                for stream in (self.holder.stdout, self.holder.stderr):
                    if stream is not None:
                        stream.close()
                self.holder = None
            run(["ip", "netns", "del", self.name], check=False)
            run(["ip", "link", "del", self.host_link], check=False)
            run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)


def start_hosts(hostnames: Iterable[str | None], workers: int = 3) -> list[FleetHost]:
    """Start a host per name (None: the netns name) on ``workers`` threads; all or none: when
    one fails, the others are stopped and the first error is raised. While this process has no
    QEMU capabilities to share yet, the first host starts alone and probes QEMU for the others
    (about 8 s of a core that each of them would spend again)."""
    hosts = [FleetHost(hostname) for hostname in hostnames]
    with _capabilities_lock:
        first_alone = _capabilities_seed is None
    results = [_start_quietly(hosts[0])] if first_alone and hosts else []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{PREFIX}fleet") as pool:
        results += list(pool.map(_start_quietly, hosts[len(results):]))
    errors = [error for error in results if error is not None]
    if errors:
        stop_hosts(hosts)
        raise errors[0]
    return hosts


def _start_quietly(host: FleetHost) -> BaseException | None:
    try:
        host.start()
    except BaseException as exc:  # reported by start_hosts once every start has ended
        return exc
    return None


def stop_hosts(hosts: Iterable[FleetHost], workers: int = 4) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda host: host.stop(), hosts))


def ssh_inventory(hosts: Mapping[str, FleetHost], group: str | None = None) -> dict[str, Any]:
    """An Ansible inventory (as YAML data) of ``hosts`` by inventory name, reached over SSH;
    with ``group``, they are also members of that group."""
    inventory: dict[str, Any] = {"all": {"hosts": {name: host.inventory_vars() for name, host in hosts.items()}}}
    if group:
        inventory["all"]["children"] = {group: {"hosts": {name: {} for name in hosts}}}
    return inventory
