"""Real hypervisors for the tests: per-user libvirt session daemons, each under its own unix
user with its own runtime, config and cache directories, serving tiny paused QEMU domains whose
VNC servers accept real clients.

Every name made here carries a prefix unique to this process, so two suites on one machine do
not collide, and ``stop()`` removes all of it (daemon, QEMU processes, directories, user).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

PREFIX = os.environ.get("VGT_LAB_PREFIX", f"vgt{os.getpid() % 100000}")


class CommandFailed(subprocess.CalledProcessError):
    """A failed command whose message carries what it printed (CalledProcessError's own
    message leaves out stderr, which is where virsh says why)."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, stream in (("stdout", self.stdout), ("stderr", self.stderr)):
            if stream and stream.strip():
                text += f"\n{label}:\n{stream.strip()}"
        return text


def run(cmd: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def create_user(name: str, home: str | None = None, groups: str = "kvm") -> None:
    cmd = ["useradd", "-r", "-s", "/usr/sbin/nologin", "-G", groups]
    cmd += ["-m", "-d", home] if home else ["-M", "-d", "/nonexistent"]
    run(cmd + [name])


def delete_user(name: str) -> None:
    run(["pkill", "-KILL", "-u", name], check=False)
    for _attempt in range(50):
        if run(["pgrep", "-u", name], check=False).returncode != 0:
            break
        time.sleep(0.1)
    run(["userdel", "-r", name], check=False)
    run(["userdel", name], check=False)


def free_tcp_port() -> int:
    """A TCP port no socket of this machine's network namespace holds now, IPv4 and IPv6."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class EventWitness:
    """``virsh event --all --loop`` on the daemon at ``uri``: an independent record of its
    domain events, identities included.

    Ready once its callbacks are registered, which virsh does not announce: the witness changes
    the domain's live metadata (every ``retry`` seconds, since a change made before virsh
    registered is never reported) until that event comes through, and raises TimeoutError when
    none does within ``timeout``. ``stop()`` waits for the sessions' disconnect events, which
    trail the clients' exit, instead of sleeping."""

    def __init__(self, uri: str, domain: str, timeout: float = 60, retry: float = 2) -> None:
        self.domain = domain
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            ["virsh", "-c", uri, "event", "--all", "--loop"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        marker = f"urn:{PREFIX}:witness:{time.monotonic_ns()}"

        def registered() -> bool:
            run(["virsh", "-q", "-c", uri, "metadata", domain, "--uri", marker, "--key", "w",
                 "--set", f"<w n='{time.monotonic_ns()}'/>", "--live"])
            return self._wait(lambda: any("metadata-change" in line and f"'{domain}'" in line
                                          for line in self.lines), retry)

        try:
            wait_for(registered, timeout, "virsh event to register its callbacks")
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return bool(self.changed.wait_for(predicate, timeout))

    def output(self) -> str:
        with self.changed:
            return "\n".join(self.lines) + "\n"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=30)

    def stop(self, disconnects: int, timeout: float = 60) -> str:
        """Everything virsh printed, once the domain's graphics events hold ``disconnects``
        disconnects (or after ``timeout``: the test's assertions then say what is missing)."""
        prefix = f"event 'graphics' for domain '{self.domain}': disconnect "
        self._wait(lambda: sum(line.startswith(prefix) for line in self.lines) >= disconnects,
                   timeout)
        self.close()
        return self.output()


def relays_events(uri: str, domain: str, timeout: float = 3) -> bool:
    """Whether the daemon at ``uri`` delivers domain events to a new listener: an EventWitness
    must see the domain's live metadata change.

    Seen with libvirt 9.0 after a listener deregistered while QEMU reported disconnects: the
    daemon then delivered no domain event (graphics or metadata) to any new listener. The likely
    cause, from libvirt's code: virObjectEventStateQueueRemote reads ``state->timer`` before
    taking the lock, so an event queued while the last listener deregisters stays queued with
    no timer armed, and listeners that register next receive nothing until all of them have
    left again. The probe's own listener leaving clears such a queue, so a failed probe followed
    by a good one has healed the daemon (the tests have seen exactly that)."""
    try:
        witness = EventWitness(uri, domain, timeout, retry=0.3)
    except TimeoutError:
        return False
    witness.close()
    return True


def heal_event_delivery(uri: str, domain: str, attempts: int = 3) -> None:
    """Make sure the daemon relays events again after an earlier test (see relays_events)."""
    for attempt in range(attempts):
        if relays_events(uri, domain):
            if attempt:
                warnings.warn(f"{uri}: libvirt's event queue was stuck; healed (attempt {attempt + 1})",
                              stacklevel=2)
            return
    raise RuntimeError(f"{uri} delivers no domain events, even to a new listener")


def console_holds(console_port: int, client_port: int) -> bool:
    """Whether the hypervisor's end of a console connection (from 127.0.0.1) is still open, as
    its kernel sees it: ESTABLISHED, or CLOSE-WAIT from the client's close until QEMU has
    closed its own socket too (and so has raised the disconnect)."""
    out = run(["ss", "-H", "-t", "-n", "state", "established", "state", "close-wait",
               f"( sport = :{console_port} and dport = :{client_port} )"]).stdout
    return bool(out.strip())


@dataclass
class Domain:
    name: str
    uuid: str
    vnc_port: int  # the console's port: VNC, or SPICE's plain port for a SPICE domain
    protocol: str = "vnc"
    tls_port: int | None = None  # SPICE's TLS port, when the daemon gives one (spice_tls = 1)


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>48</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='vnc' autoport='yes' listen='{listen}'/>
    <video><model type='cirrus'/></video>
  </devices>
</domain>
"""


class SessionHypervisor:
    """One libvirt session daemon (``qemu:///session``) under a unix user of its own."""

    def __init__(self, tag: str, qemu_conf: str = 'vnc_listen = "127.0.0.1"\n'):
        self.user = f"{PREFIX}{tag}"[:31]
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.user}-"))
        self.qemu_conf = qemu_conf
        self.env = {
            "XDG_RUNTIME_DIR": str(self.base / "run"),
            "XDG_CONFIG_HOME": str(self.base / "config"),
            "XDG_CACHE_HOME": str(self.base / "cache"),
            "HOME": str(self.base),
        }
        self.socket = self.base / "run" / "libvirt" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        self._user_made = False
        self.domains: list[Domain] = []  # for the caller's bookkeeping (the integration fixtures)

    # -- daemon ---------------------------------------------------------------------------
    def start(self) -> SessionHypervisor:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            create_user(self.user)
            self._user_made = True
        for sub in ("run", "config/libvirt", "cache"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "config/libvirt/qemu.conf").write_text(self.qemu_conf)
        os.chmod(self.base / "run", 0o700)
        shutil.chown(self.base, self.user)
        for path in self.base.rglob("*"):
            shutil.chown(path, self.user)
        self.start_daemon()
        return self

    def start_daemon(self) -> None:
        env = [f"{k}={v}" for k, v in self.env.items()]
        run(["runuser", "-u", self.user, "--", "env", *env, "libvirtd", "-d"])
        wait_for(lambda: self.virsh("version", check=False).returncode == 0, 30,
                 f"session libvirtd of {self.user}")

    @property
    def pidfile(self) -> Path:
        return self.base / "run" / "libvirt" / "libvirtd.pid"

    def daemon_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_daemon(self) -> None:
        pid = self.daemon_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "libvirtd to exit")
        except TimeoutError:
            # a daemon still busy with a storm's backlog (libvirt queues events for a slow
            # listener without bound) may not get to its SIGTERM for minutes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "libvirtd to die")

    def stop(self) -> None:
        try:
            if self.daemon_pid() is not None:
                try:
                    for name in self.virsh("list", "--name", check=False, timeout=20).stdout.split():
                        self.virsh("destroy", name, check=False, timeout=20)
                except subprocess.TimeoutExpired:
                    pass  # a daemon that does not answer: its QEMUs go with the user's processes below
            self.stop_daemon()
        finally:
            run(["pkill", "-KILL", "-u", self.user], check=False)
            if self._user_made:
                delete_user(self.user)
            shutil.rmtree(self.base, ignore_errors=True)

    # -- domains --------------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return run(["virsh", "-q", "-c", self.uri, *args], check=check, timeout=timeout)

    def create_domain(self, name: str, listen: str = "127.0.0.1", port: int | None = None,
                      graphics: str = "vnc", password: str | None = None,
                      secure_channels: tuple[str, ...] = ()) -> Domain:
        """A paused domain; its VNC (or SPICE, ``graphics="spice"``, with qxl video) on
        ``port`` when given (outside libvirt's autoport range, say), else on the port libvirt
        picks; ``password`` sets the console's password (``passwd=``); ``secure_channels`` are
        SPICE channels served on the TLS port only (``<channel name=... mode='secure'/>``)."""
        xml = DOMAIN_XML.format(name=escape(name), listen=escape(listen))
        if graphics == "spice":
            xml = xml.replace("<graphics type='vnc'", "<graphics type='spice'").replace("'cirrus'", "'qxl'")
            channels = "".join(f"<channel name='{escape(c)}' mode='secure'/>" for c in secure_channels)
            if channels:
                xml = xml.replace(f"listen='{escape(listen)}'/>", f"listen='{escape(listen)}'>{channels}</graphics>")
        elif graphics != "vnc":
            raise ValueError(f"graphics must be vnc or spice, not {graphics!r}")
        if password is not None:
            xml = xml.replace(" autoport=", f" passwd='{escape(password)}' autoport=")
        if port is not None:
            xml = xml.replace("autoport='yes'", f"autoport='no' port='{port}'")
        xml_file = self.base / f"{name}.xml"
        xml_file.write_text(xml)
        try:
            self.virsh("create", "--paused", str(xml_file))
        except CommandFailed as exc:
            # Each session daemon hands out autoport ports on its own: another suite's (or another
            # daemon's) QEMU may hold the one it picked ("Failed to find an available port").
            # Once, on a port the kernel says is free on every address.
            if port is not None or graphics != "vnc" or "Address already in use" not in str(exc):
                raise
            port = free_tcp_port()
            xml_file.write_text(xml.replace("autoport='yes'", f"autoport='no' port='{port}'"))
            self.virsh("create", "--paused", str(xml_file))
        tls_port = None
        if graphics == "spice":
            xml_now = self.virsh("dumpxml", name).stdout
            port = int(re.search(r"<graphics type='spice' port='(\d+)'", xml_now).group(1))  # type: ignore[union-attr]
            found = re.search(r"<graphics type='spice'[^>]* tlsPort='(\d+)'", xml_now)
            tls_port = int(found.group(1)) if found else None
        elif port is None:
            display = self.virsh("domdisplay", name).stdout.strip()
            port = 5900 + int(display.rsplit(":", 1)[1])
        uuid = self.virsh("domuuid", name).stdout.strip()
        return Domain(name=name, uuid=uuid, vnc_port=port, protocol=graphics, tls_port=tls_port)

    def destroy_domain(self, name: str) -> None:
        self.virsh("destroy", name, check=False)

    def query_vnc(self, name: str) -> str:
        return self.virsh("qemu-monitor-command", name, '{"execute":"query-vnc"}').stdout
