"""The machine's own system libvirt daemon (``qemu:///system``) for the host-role tests.

There is no systemd here: the daemon is a plain ``libvirtd -d`` process with its pid in
``/run/libvirtd.pid``, next to its own ``virtlogd -d``. ``SystemLibvirtd`` brings both up when
they are not running, records everything it changes under ``/etc`` (restored by ``stop()``) and
every user and directory it creates (removed by ``stop()``), and stops only the daemons it
started itself, whatever pid the roles under test gave libvirtd by restarting it.

The packaged QEMU driver runs QEMU as ``libvirt-qemu:libvirt-qemu``; with ``security_driver =
"none"`` nothing relabels files for it, so certificates and the sasldb must be readable by that
group. This machine also needs ``namespaces = []``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

from lab.hypervisor import PREFIX, DOMAIN_XML, Domain, run, wait_for

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
QEMU_USER = QEMU_GROUP = "libvirt-qemu"
# What this machine needs for any system domain to start (see LAB.md).
BASE_QEMU_CONF = 'security_driver = "none"\nnamespaces = []\n'
STATE_DIRS = ("/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu", "/var/cache/libvirt")


def pid_from(pidfile: Path) -> int | None:
    """The pid in a pidfile if that process is alive, else None."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def stop_pid(pid: int, timeout: float = 30) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout, f"pid {pid} to exit")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


class EtcBackup:
    """Copies of files and trees before a test changes them, put back by ``restore()``:
    what existed comes back as it was, what did not exist is removed, with any parent
    directories that had to be made for it."""

    def __init__(self) -> None:
        self.store = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-etc-backup-"))
        self.saved: dict[Path, Path | None] = {}
        self.made_parents: list[Path] = []

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path in self.saved:
            return
        if path.exists() or path.is_symlink():
            copy = self.store / str(len(self.saved))
            if path.is_dir() and not path.is_symlink():
                shutil.copytree(path, copy, symlinks=True)
            else:
                shutil.copy2(path, copy, follow_symlinks=False)
            self.saved[path] = copy
        else:
            self.saved[path] = None
            parent = path.parent
            while not parent.exists():
                self.made_parents.append(parent)
                parent = parent.parent

    def restore(self) -> None:
        for path, copy in self.saved.items():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            if copy is not None:
                if copy.is_dir():
                    shutil.copytree(copy, path, symlinks=True)
                    shutil.copystat(copy, path)
                else:
                    shutil.copy2(copy, path, follow_symlinks=False)
                stat = copy.lstat()
                os.lchown(path, stat.st_uid, stat.st_gid)
        # Deepest first; leave any a test (or someone else) filled with other files.
        for parent in sorted(set(self.made_parents), key=lambda p: len(p.parts), reverse=True):
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        shutil.rmtree(self.store, ignore_errors=True)


class SystemLibvirtd:
    """The system daemon and its virtlogd, brought up for a test module and put back after."""

    def __init__(self, extra_qemu_conf: str = "") -> None:
        self.extra_qemu_conf = extra_qemu_conf
        self.backup = EtcBackup()
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-system-"))
        os.chmod(self.base, 0o755)
        self.started_libvirtd = False
        self.started_virtlogd = False
        self.made_dirs: list[Path] = []
        self.made_users: list[str] = []
        self.made_groups: list[str] = []
        self.domains: list[str] = []
        # libvirtd's drivers make directories here (nwfilter, secrets, qemu) when it starts.
        self.etc_libvirt_before: set[str] | None = None

    # -- set up ---------------------------------------------------------------------------
    def start(self) -> "SystemLibvirtd":
        if pid_from(LIBVIRTD_PIDFILE) is not None:
            raise RuntimeError(
                f"a system libvirtd is already running (pid {pid_from(LIBVIRTD_PIDFILE)}); "
                "these tests restart it and rewrite qemu.conf, so they only run when they "
                "start it themselves")
        try:
            self._ensure_qemu_account()
            for name in STATE_DIRS:
                self._mkdir(Path(name))
            self.backup.save(QEMU_CONF)
            QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
            self.etc_libvirt_before = set(os.listdir(QEMU_CONF.parent))
            QEMU_CONF.write_text(BASE_QEMU_CONF + self.extra_qemu_conf)
            os.chmod(QEMU_CONF, 0o600)
            if pid_from(VIRTLOGD_PIDFILE) is None:
                run(["virtlogd", "-d"])
                self.started_virtlogd = True
                wait_for(lambda: Path("/run/libvirt/virtlogd-sock").exists(), 30, "virtlogd")
            run(["libvirtd", "-d"])
            self.started_libvirtd = True
            self.wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _ensure_qemu_account(self) -> None:
        try:
            grp.getgrnam(QEMU_GROUP)
        except KeyError:
            run(["groupadd", "-r", QEMU_GROUP])
            self.made_groups.append(QEMU_GROUP)
        try:
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            groups = ["-G", "kvm"] if _group_exists("kvm") else []
            run(["useradd", "-r", "-g", QEMU_GROUP, *groups, "-M", "-d", "/var/lib/libvirt",
                 "-s", "/usr/sbin/nologin", QEMU_USER])
            self.made_users.append(QEMU_USER)

    def _mkdir(self, path: Path) -> None:
        missing = []
        parent = path
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        path.mkdir(parents=True, exist_ok=True)
        self.made_dirs.extend(missing)

    # -- the daemon -----------------------------------------------------------------------
    def pid(self) -> int | None:
        return pid_from(LIBVIRTD_PIDFILE)

    def wait_until_serving(self, timeout: float = 60) -> None:
        wait_for(lambda: self.virsh("version", check=False).returncode == 0, timeout,
                 "the system libvirtd to answer")

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["virsh", "-q", "-c", URI, *args], check=check)

    def create_domain(self, name: str) -> Domain:
        """A tiny paused domain whose VNC server listens where qemu.conf says (vnc_listen)."""
        xml = DOMAIN_XML.format(name=escape(name), listen="")
        xml = xml.replace(" listen=''", "")
        xml_file = self.base / f"{name}.xml"
        xml_file.write_text(xml)
        self.domains.append(name)
        self.virsh("create", "--paused", str(xml_file))
        display = self.virsh("domdisplay", name).stdout.strip()
        port = 5900 + int(display.rsplit(":", 1)[1])
        uuid = self.virsh("domuuid", name).stdout.strip()
        return Domain(name=name, uuid=uuid, vnc_port=port)

    def qemu_command(self, domain: str, command: str) -> str:
        return self.virsh("qemu-monitor-command", domain, command).stdout

    # -- tear down ------------------------------------------------------------------------
    def stop(self) -> None:
        try:
            if self.started_libvirtd and self.pid() is not None:
                for name in self.domains:
                    self.virsh("destroy", name, check=False)
            if self.started_libvirtd and (pid := self.pid()) is not None:
                stop_pid(pid)
            if self.started_virtlogd and (pid := pid_from(VIRTLOGD_PIDFILE)) is not None:
                stop_pid(pid)
        finally:
            self.backup.restore()
            if self.etc_libvirt_before is not None:
                for name in set(os.listdir(QEMU_CONF.parent)) - self.etc_libvirt_before:
                    path = QEMU_CONF.parent / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            for user in self.made_users:
                run(["userdel", user], check=False)
            for group in self.made_groups:
                run(["groupdel", group], check=False)
            for path in sorted(self.made_dirs, key=lambda p: len(p.parts), reverse=True):
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(self.base, ignore_errors=True)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


class GraphicsEventWitness:
    """``virsh event --event graphics --loop`` on the system daemon: an independent record
    of the graphics events, identities included."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["virsh", "-c", URI, "event", "--event", "graphics", "--loop"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)  # let virsh register its callback before anything connects

    def stop(self) -> str:
        time.sleep(1)  # the disconnect event trails the client's exit
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out


class TlsSaslConsoleClient:
    """gvnccapture under a unix user of its own, holding one client certificate: it reads
    ``~/.pki`` from its passwd home (not $HOME), and the SASL user name and password from a
    terminal, so it runs on a pty."""

    def __init__(self, tag: str) -> None:
        self.user = f"{PREFIX}{tag}"[:31]
        self.home = Path(tempfile.mkdtemp(prefix=f"{self.user}-home-"))
        run(["useradd", "-M", "-d", str(self.home), "-s", "/usr/sbin/nologin", self.user])
        shutil.chown(self.home, self.user)
        os.chmod(self.home, 0o755)

    def install_identity(self, ca_cert: Path, client_cert: Path, client_key: Path) -> None:
        pki = self.home / ".pki"
        shutil.rmtree(pki, ignore_errors=True)
        for sub, source, mode in (("CA/cacert.pem", ca_cert, 0o644),
                                  ("gvnccapture/clientcert.pem", client_cert, 0o644),
                                  ("gvnccapture/private/clientkey.pem", client_key, 0o600)):
            target = pki / sub
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            os.chmod(target, mode)
        for path in [pki, *pki.rglob("*")]:
            shutil.chown(path, self.user)

    def capture(self, host: str, port: int, username: str, password: str,
                timeout: float = 40) -> tuple[int, str]:
        """Connect, log in, save one frame; (exit status, what gvnccapture printed)."""
        import pty
        import select

        shot = self.home / "shot.png"
        pid, fd = pty.fork()
        if pid == 0:  # the child: nothing but exec
            os.execvp("runuser", ["runuser", "-u", self.user, "--", "gvnccapture",
                                  f"{host}:{port - 5900}", str(shot)])
        output, answered = b"", set()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                try:
                    data = os.read(fd, 1024)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                output += data
                lowered = output.lower()
                if b"username:" in lowered and "user" not in answered:
                    os.write(fd, username.encode() + b"\n")
                    answered.add("user")
                if b"password:" in lowered and "password" not in answered:
                    os.write(fd, password.encode() + b"\n")
                    answered.add("password")
            else:
                os.kill(pid, signal.SIGKILL)
            _, raw = os.waitpid(pid, 0)
            status = os.waitstatus_to_exitcode(raw)
        finally:
            os.close(fd)
        return status, output.decode(errors="replace")

    def remove(self) -> None:
        run(["pkill", "-KILL", "-u", self.user], check=False)
        run(["userdel", self.user], check=False)
        shutil.rmtree(self.home, ignore_errors=True)
