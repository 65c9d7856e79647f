# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The system libvirt daemon and its running domains, driven through the host's own tools
(``systemctl``, ``libvirtd``, ``virsh``): no libvirt Python binding is needed on the host.

Used by the ``libvirtd_restart`` and ``vnc_display_reload`` modules, which the ``vnc_tls`` and
``vnc_sasl`` roles call from their handlers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable

from ansible_collections.virtguard.console.plugins.module_utils.host_commands import GetBinPath, Run

SYSTEMD_RUNTIME_DIR = "/run/systemd/system"


class LibvirtHostError(Exception):
    """An expected failure, reported to the user as the module's ``msg``."""


def uses_systemd() -> bool:
    """The test systemd itself documents (sd_booted): this directory exists only under it."""
    return os.path.isdir(SYSTEMD_RUNTIME_DIR)


def alive_pid(pidfile: str) -> int | None:
    """The pid written in ``pidfile`` when that process still runs, else None."""
    try:
        with open(pidfile, encoding="ascii") as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def process_start_time(pid: int) -> float | None:
    """When a process started, in seconds since the epoch (from /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # The command name may hold spaces and parentheses: fields start after the last ')'.
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def newest_change(paths: list[str]) -> float | None:
    """The latest modification time among the paths that exist, or None."""
    times = [os.stat(path).st_mtime for path in paths if os.path.exists(path)]
    return max(times) if times else None


def daemon_read_config(pid: int | None, config_files: list[str]) -> bool:
    """Whether a running daemon started after the config files last changed, so it already
    runs with them: a second role's handler in the same play then has nothing to do."""
    if pid is None or not config_files:
        return False
    started = process_start_time(pid)
    changed = newest_change(config_files)
    return started is not None and changed is not None and started > changed


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LibvirtHostError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Libvirtd:
    """Restart the system daemon the way the host runs it: through systemd when the host
    boots with it, else as the plain ``libvirtd -d`` process its pidfile names."""

    def __init__(self, run_command: Run, get_bin_path: GetBinPath, *, pidfile: str, uri: str,
                 service: str, timeout: float) -> None:
        self.run_command = run_command
        self.get_bin_path = get_bin_path
        self.pidfile = pidfile
        self.uri = uri
        self.service = service
        self.timeout = timeout

    def serving(self) -> bool:
        rc, _out, _err = self.run_command([self.get_bin_path("virsh", True), "-c", self.uri, "version"])
        return rc == 0

    def main_pid(self, method: str) -> int | None:
        if method == "systemd":
            rc, out, _err = self.run_command(
                ["systemctl", "show", "--property=MainPID", "--value", self.service])
            pid = int(out.strip() or 0) if rc == 0 else 0
            return pid or None
        return alive_pid(self.pidfile)

    def restart(self, method: str) -> dict[str, int | None]:
        before = self.main_pid(method)
        if method == "systemd":
            rc, out, err = self.run_command(["systemctl", "restart", self.service])
            if rc != 0:
                raise LibvirtHostError(f"systemctl restart {self.service} failed: {err or out}")
        else:
            argv = self._command_line(before)
            if before is not None:
                self._stop(before)
            rc, out, err = self.run_command(argv)
            if rc != 0:
                raise LibvirtHostError(f"{' '.join(argv)} failed (rc {rc}): {err or out}")
        wait_until(self.serving, self.timeout, f"libvirtd to answer on {self.uri}")
        return {"pid_before": before, "pid_after": self.main_pid(method)}

    def _command_line(self, pid: int | None) -> list[str]:
        """The running daemon's own arguments (a --config or --listen it was given stays),
        daemonized; a fresh ``libvirtd -d`` when none runs."""
        binary = self.get_bin_path("libvirtd", True, ["/usr/sbin", "/sbin"])
        args: list[str] = []
        if pid is not None:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    args = [a.decode() for a in handle.read().split(b"\0")[1:] if a]
            except OSError:
                args = []
        if "-d" not in args and "--daemon" not in args:
            args.append("-d")
        return [binary, *args]

    def _stop(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), self.timeout,
                   f"libvirtd (pid {pid}) to exit")


def vnc_tls_enabled(vnc_servers: list[dict[str, Any]]) -> bool:
    """Whether a domain's VNC server (QMP ``query-vnc-servers``) authenticates with x509."""
    return any(str(server.get("vencrypt", "")).startswith("x509") for server in vnc_servers)


class VncCertificateReload:
    """Make running domains re-read their VNC TLS certificates (QMP ``display-reload``,
    QEMU 6.0 and later) instead of keeping the ones they started with."""

    def __init__(self, run_command: Run, get_bin_path: GetBinPath, *, uri: str) -> None:
        self.run_command = run_command
        self.virsh = get_bin_path("virsh", True)
        self.uri = uri

    def running_domains(self) -> list[str]:
        rc, out, err = self.run_command([self.virsh, "-c", self.uri, "list", "--name"])
        if rc != 0:
            raise LibvirtHostError(f"cannot list the domains on {self.uri}: {err or out}")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def qmp(self, domain: str, command: dict[str, Any]) -> dict[str, Any]:
        rc, out, err = self.run_command(
            [self.virsh, "-c", self.uri, "qemu-monitor-command", domain, json.dumps(command)])
        if rc != 0:
            raise LibvirtHostError((err or out).strip())
        reply: dict[str, Any] = json.loads(out)
        return reply

    def plan(self, domains: list[str] | None) -> tuple[list[str], dict[str, str]]:
        """The domains whose VNC server uses TLS, and why each other one is left alone."""
        candidates = domains or self.running_domains()
        with_tls: list[str] = []
        skipped: dict[str, str] = {}
        for domain in candidates:
            try:
                servers = self.qmp(domain, {"execute": "query-vnc-servers"}).get("return", [])
            except (LibvirtHostError, ValueError) as exc:
                skipped[domain] = f"cannot query its VNC server: {exc}"
                continue
            if vnc_tls_enabled(servers):
                with_tls.append(domain)
            else:
                skipped[domain] = "its VNC server does not use TLS certificates"
        return with_tls, skipped

    def reload(self, domain: str) -> None:
        self.qmp(domain, {"execute": "display-reload",
                          "arguments": {"type": "vnc", "tls-certs": True}})
