"""The machine's own system libvirt daemon (``qemu:///system``) for the host-role tests.

There is no systemd here: the daemon is a plain ``libvirtd -d`` process with its pid in
``/run/libvirtd.pid``, next to its own ``virtlogd -d``. ``SystemLibvirtd`` brings both up when
they are not running, records everything it changes under ``/etc`` (restored by ``stop()``) and
every user and directory it creates (removed by ``stop()``), and stops only the daemons it
started itself, whatever pid the roles under test gave libvirtd by restarting it.

The packaged QEMU driver runs QEMU as ``libvirt-qemu:libvirt-qemu``; with ``security_driver =
"none"`` nothing relabels files for it, so certificates and the sasldb must be readable by that
group. This machine also needs ``namespaces = []``.

The session daemons of other suites allocate VNC ports from 5900 up, each with its own
allocator, and a system domain takes tens of seconds from port reservation to QEMU binding it
here: the system daemon gets a port range of its own (``remote_display_port_min``/``max``) so
that the two never pick the same port.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import termios
import time
from pathlib import Path
from xml.sax.saxutils import escape

from lab.hypervisor import PREFIX, DOMAIN_XML, CommandFailed, Domain, EventWitness, run, wait_for

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
QEMU_USER = QEMU_GROUP = "libvirt-qemu"
# VNC ports of system domains: far above those the session daemons of other suites take
# (5900 up), below the ephemeral range.
DISPLAY_PORT_MIN, DISPLAY_PORT_MAX = 15900, 15999
# What this machine needs for any system domain to start (see LAB.md), and the port range.
BASE_QEMU_CONF = ('security_driver = "none"\nnamespaces = []\n'
                  f"remote_display_port_min = {DISPLAY_PORT_MIN}\n"
                  f"remote_display_port_max = {DISPLAY_PORT_MAX}\n")
STATE_DIRS = ("/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu", "/var/cache/libvirt")
# What a run has changed so far, kept outside /tmp with the backups, so that the next run can
# put the host back when this one was killed before its teardown (a daemon left running would
# otherwise make every later run skip, and qemu.conf and /etc/pki would stay changed).
JOURNAL = Path("/var/tmp/virtguard-tests-system-libvirtd.json")


def pid_from(pidfile: Path, name: str | None = None) -> int | None:
    """The pid in a pidfile if that process is alive (and, given a name, runs that program:
    a stale pidfile's pid may belong to another process by now), else None."""
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if name is None or comm == name else None


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid, who it is."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop_pid(pid: int, timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it lingers; returns once the process is gone."""

    def gone() -> bool:
        return not Path(f"/proc/{pid}").exists()

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(gone, timeout, f"pid {pid} to exit")
    except TimeoutError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_for(gone, 30, f"pid {pid} to exit after SIGKILL")


class EtcBackup:
    """Copies of files and trees before a test changes them, put back by ``restore()``:
    what existed comes back as it was, what did not exist is removed, with any parent
    directories that had to be made for it."""

    def __init__(self) -> None:
        self.store = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-etc-backup-", dir="/var/tmp"))
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

    # -- what this run changed, on disk ---------------------------------------------------
    def _journal(self) -> None:
        state = {
            "owner": [os.getpid(), start_time(os.getpid())],
            "started_libvirtd": self.started_libvirtd,
            "started_virtlogd": self.started_virtlogd,
            "made_dirs": [str(p) for p in self.made_dirs],
            "made_users": self.made_users,
            "made_groups": self.made_groups,
            "domains": self.domains,
            "base": str(self.base),
            "etc_libvirt_before": (None if self.etc_libvirt_before is None
                                   else sorted(self.etc_libvirt_before)),
            "backup_store": str(self.backup.store),
            "backup_saved": [[str(k), None if v is None else str(v)]
                             for k, v in self.backup.saved.items()],
            "backup_made_parents": [str(p) for p in self.backup.made_parents],
        }
        tmp = JOURNAL.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(JOURNAL)

    @classmethod
    def _from_journal(cls, state: dict) -> "SystemLibvirtd":
        self = cls.__new__(cls)
        self.extra_qemu_conf = ""
        self.backup = EtcBackup.__new__(EtcBackup)
        self.backup.store = Path(state["backup_store"])
        self.backup.saved = {Path(k): None if v is None else Path(v)
                             for k, v in state["backup_saved"]}
        self.backup.made_parents = [Path(p) for p in state["backup_made_parents"]]
        self.base = Path(state["base"])
        self.started_libvirtd = state["started_libvirtd"]
        self.started_virtlogd = state["started_virtlogd"]
        self.made_dirs = [Path(p) for p in state["made_dirs"]]
        self.made_users = state["made_users"]
        self.made_groups = state["made_groups"]
        self.domains = state["domains"]
        before = state["etc_libvirt_before"]
        self.etc_libvirt_before = None if before is None else set(before)
        return self

    @classmethod
    def recover_leftovers(cls) -> None:
        """Put back what an earlier run changed and could not restore (it was killed); leave
        alone a run that still goes on (RuntimeError: these tests then skip)."""
        try:
            state = json.loads(JOURNAL.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            JOURNAL.unlink()
            return
        pid, started = state["owner"]
        if start_time(pid) == started:
            raise RuntimeError(f"another test run (pid {pid}) uses the system libvirtd")
        cls._from_journal(state).stop()

    # -- set up ---------------------------------------------------------------------------
    def start(self) -> "SystemLibvirtd":
        self.recover_leftovers()
        if (running := pid_from(LIBVIRTD_PIDFILE, "libvirtd")) is not None:
            raise RuntimeError(
                f"a system libvirtd is already running (pid {running}); "
                "these tests restart it and rewrite qemu.conf, so they only run when they "
                "start it themselves")
        try:
            self.backup.save(QEMU_CONF)
            QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
            self.etc_libvirt_before = set(os.listdir(QEMU_CONF.parent))
            self._journal()
            self._ensure_qemu_account()
            for name in STATE_DIRS:
                self._mkdir(Path(name))
            self._journal()
            QEMU_CONF.write_text(BASE_QEMU_CONF + self.extra_qemu_conf)
            os.chmod(QEMU_CONF, 0o600)
            if pid_from(VIRTLOGD_PIDFILE, "virtlogd") is None:
                self.started_virtlogd = True  # journalled before it runs
                self._journal()
                run(["virtlogd", "-d"])
                wait_for(lambda: Path("/run/libvirt/virtlogd-sock").exists(), 30, "virtlogd")
            self.started_libvirtd = True
            self._journal()
            run(["libvirtd", "-d"])
            self.wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _ensure_qemu_account(self) -> None:
        # Each is journalled before it is made, and forgotten again if it could not be.
        if not _group_exists(QEMU_GROUP):
            self._make(self.made_groups, QEMU_GROUP, ["groupadd", "-r", QEMU_GROUP])
        try:
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            groups = ["-G", "kvm"] if _group_exists("kvm") else []
            self._make(self.made_users, QEMU_USER,
                       ["useradd", "-r", "-g", QEMU_GROUP, *groups, "-M", "-d",
                        "/var/lib/libvirt", "-s", "/usr/sbin/nologin", QEMU_USER])

    def _make(self, made: list[str], name: str, cmd: list[str]) -> None:
        made.append(name)
        self._journal()
        try:
            run(cmd)
        except BaseException:
            made.remove(name)
            self._journal()
            raise

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
        return pid_from(LIBVIRTD_PIDFILE, "libvirtd")

    def wait_until_serving(self, timeout: float = 120) -> None:
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
        self._journal()
        try:
            self.virsh("create", "--paused", str(xml_file))
        except CommandFailed as exc:
            log = Path("/var/log/libvirt/qemu") / f"{name}.log"
            try:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            except OSError:
                tail = "(none)"
            raise RuntimeError(f"{exc}\nend of {log}:\n{tail}") from exc
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
            if self.started_virtlogd and (pid := pid_from(VIRTLOGD_PIDFILE, "virtlogd")):
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
            JOURNAL.unlink(missing_ok=True)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


class GraphicsEventWitness(EventWitness):
    """``virsh event --all --loop`` on the system daemon: an independent record of the graphics
    events, identities included (lab.hypervisor.EventWitness)."""

    def __init__(self, domain: str, timeout: float = 60) -> None:
        super().__init__(URI, domain, timeout)


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
                timeout: float = 90) -> tuple[int, str]:
        """Connect, log in, save one frame; (exit status, what gvnccapture printed).

        gvnccapture prints its password prompt, then turns the terminal's echo off with
        TCSAFLUSH, which throws away whatever was typed in between: the password is typed only
        once echo is off (the pty master reports the terminal's modes). A gvnccapture still
        running after ``timeout`` is killed and reported as an error, not as a status."""
        import pty
        import select

        shot = self.home / "shot.png"
        pid, fd = pty.fork()
        if pid == 0:  # the child: nothing but exec
            os.execvp("runuser", ["runuser", "-u", self.user, "--", "gvnccapture",
                                  f"{host}:{port - 5900}", str(shot)])
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
                ready = select.select([fd], [], [], 0.02 if waiting_for_echo_off else 0.5)[0]
                if not ready:
                    continue
                try:
                    data = os.read(fd, 1024)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                output += data
            raw = os.waitpid(pid, 0)[1]
            status = os.waitstatus_to_exitcode(raw)
        finally:
            os.close(fd)
        text = output.decode(errors="replace").replace(password, "<password>")
        if timed_out:
            raise TimeoutError(f"gvnccapture {host}:{port} still running after {timeout:g}s "
                               f"(killed); it printed:\n{text}")
        return status, text

    def remove(self) -> None:
        run(["pkill", "-KILL", "-u", self.user], check=False)
        run(["userdel", self.user], check=False)
        shutil.rmtree(self.home, ignore_errors=True)
