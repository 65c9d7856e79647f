"""The system libvirt daemon and its domains through the host's tools (module_utils.libvirt_host):
pidfiles and /proc read for real (processes this test starts), the commands (virsh, systemctl,
libvirtd) answered by a fake that records them. The real daemon is restarted in
tests/integration/test_host_roles.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils import libvirt_host
from ansible_collections.virtguard.console.plugins.module_utils.libvirt_host import (
    Libvirtd,
    LibvirtHostError,
    VncCertificateReload,
    alive_pid,
    daemon_read_config,
    newest_change,
    process_start_time,
    uses_systemd,
    vnc_tls_enabled,
    wait_until,
)

URI = "qemu:///system"


class FakeCommands:
    """``run_command`` and ``get_bin_path``: answers by command and verb (``systemctl show``,
    ``virsh version``) or by command alone, in order, the last one repeated; every call
    recorded."""

    def __init__(self, answers: dict[str, list[tuple[int, str, str]]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[list[str]] = []
        self.bin_paths: list[tuple[Any, ...]] = []

    def run(self, argv: list[str], **kwargs: Any) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        name = os.path.basename(argv[0])
        verb = argv[3] if name == "virsh" else argv[1] if len(argv) > 1 else ""
        queue = self.answers.get(f"{name} {verb}") or self.answers.get(name)
        if not queue:
            return 0, "", ""
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def get_bin_path(self, *args: Any) -> str:
        self.bin_paths.append(args)
        return f"/fake/{args[0]}"


def started(argv: list[str]) -> subprocess.Popen[bytes]:
    """A process running ``argv``, once it has (its /proc/PID/cmdline is argv, not the fork's)."""
    proc = subprocess.Popen(argv)
    wanted = "\0".join(argv).encode() + b"\0"
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != wanted:
        assert time.monotonic() < deadline, f"{argv} did not start"
        time.sleep(0.005)
    return proc


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for a daemon (its name has a space and parentheses, as a command
    name may), reaped by a thread as soon as it exits, as init would."""
    binary = tmp_path / "lib virtd) (x"
    shutil.copy(shutil.which("perl") or "/usr/bin/perl", binary)
    proc = started([str(binary), "-e", "sleep 30", "--", "--listen"])
    threading.Thread(target=proc.wait, daemon=True).start()
    yield proc
    proc.kill()


def gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- the host's processes and files -----------------------------------------------------------------
def test_systemd_is_the_runtime_directory_it_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(libvirt_host, "SYSTEMD_RUNTIME_DIR", str(tmp_path / "systemd"))
    assert not uses_systemd()
    (tmp_path / "systemd").mkdir()
    assert uses_systemd()
    monkeypatch.setattr(libvirt_host, "SYSTEMD_RUNTIME_DIR", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    assert not uses_systemd()


def test_a_pidfile_names_a_running_process_or_nothing(tmp_path, sleeper):
    pidfile = tmp_path / "libvirtd.pid"
    assert alive_pid(str(pidfile)) is None  # no file
    pidfile.write_text(f"  {sleeper.pid}\n")
    assert alive_pid(str(pidfile)) == sleeper.pid
    pidfile.write_text(f"{gone_pid()}\n")
    assert alive_pid(str(pidfile)) is None
    for junk in ("", "libvirtd\n", "12 13\n"):
        pidfile.write_text(junk)
        assert alive_pid(str(pidfile)) is None


def test_a_process_start_time_is_read_past_its_odd_name(sleeper):
    started = time.time()
    found = process_start_time(sleeper.pid)
    assert found is not None
    # the sleeper started just before this test's clock; /proc counts clock ticks since boot
    assert started - 5 < found <= started + 0.05
    assert process_start_time(gone_pid()) is None
    own = process_start_time(os.getpid())
    assert own is not None and own <= found


def test_the_newest_change_of_the_files_that_exist(tmp_path):
    first, second = tmp_path / "a.conf", tmp_path / "b.conf"
    first.write_text("")
    second.write_text("")
    os.utime(first, (1_000_000, 1_000_000))
    os.utime(second, (2_000_000, 2_000_000))
    assert newest_change([str(first), str(second), str(tmp_path / "missing")]) == 2_000_000
    assert newest_change([str(first)]) == 1_000_000
    assert newest_change([str(tmp_path / "missing")]) is None
    assert newest_change([]) is None


def test_a_daemon_read_its_config_when_it_started_after_the_last_change(tmp_path, sleeper):
    conf, other = tmp_path / "qemu.conf", tmp_path / "libvirtd.conf"
    conf.write_text("")
    other.write_text("")
    old = time.time() - 3600
    os.utime(conf, (old, old))
    os.utime(other, (old, old))
    assert daemon_read_config(sleeper.pid, [str(conf), str(other)])
    later = time.time() + 3600  # changed after the daemon started
    os.utime(other, (later, later))
    assert not daemon_read_config(sleeper.pid, [str(conf), str(other)])
    assert not daemon_read_config(None, [str(conf)])
    assert not daemon_read_config(sleeper.pid, [])
    assert not daemon_read_config(sleeper.pid, [str(tmp_path / "missing")])
    assert not daemon_read_config(gone_pid(), [str(conf)])


def test_wait_until_returns_once_true_and_times_out_naming_what_it_waited_for():
    answers = iter([False, False, True])
    started = time.monotonic()
    wait_until(lambda: next(answers), 5, "the third answer", interval=0.01)
    assert time.monotonic() - started < 1
    with pytest.raises(LibvirtHostError, match=r"^timed out after 0.2s waiting for libvirtd to answer$"):
        wait_until(lambda: False, 0.2, "libvirtd to answer", interval=0.05)
    calls: list[float] = []
    with pytest.raises(LibvirtHostError):
        wait_until(lambda: calls.append(time.monotonic()), 0.3, "nothing", interval=0.1)
    assert 2 <= len(calls) <= 6  # asked every interval, not in a busy loop


# -- restarting libvirtd ------------------------------------------------------------------------------
def daemon(commands: FakeCommands, pidfile: Path, timeout: float = 5) -> Libvirtd:
    return Libvirtd(commands.run, commands.get_bin_path, pidfile=str(pidfile), uri=URI, service="libvirtd",
                    timeout=timeout)


def test_serving_is_virsh_version_answering(tmp_path):
    commands = FakeCommands({"virsh": [(1, "", "error: failed to connect")]})
    assert not daemon(commands, tmp_path / "pid").serving()
    assert commands.calls == [["/fake/virsh", "-c", URI, "version"]]
    assert daemon(FakeCommands(), tmp_path / "pid").serving()


@pytest.mark.parametrize("answer, pid", [((0, "1234\n", ""), 1234), ((0, "0\n", ""), None), ((0, "", ""), None),
                                         ((1, "1234\n", "no such unit"), None)])
def test_systemds_main_pid(tmp_path, answer, pid):
    commands = FakeCommands({"systemctl show": [answer]})
    assert daemon(commands, tmp_path / "pid").main_pid("systemd") == pid
    assert commands.calls == [["systemctl", "show", "--property=MainPID", "--value", "libvirtd"]]


def test_a_systemd_restart_asks_systemctl_and_waits_for_the_daemon(tmp_path):
    commands = FakeCommands({"systemctl show": [(0, "100\n", ""), (0, "200\n", "")],
                             "virsh": [(1, "", "not yet"), (0, "", "")]})
    assert daemon(commands, tmp_path / "pid").restart("systemd") == {"pid_before": 100, "pid_after": 200}
    assert ["systemctl", "restart", "libvirtd"] in commands.calls
    assert commands.calls.count(["/fake/virsh", "-c", URI, "version"]) == 2


@pytest.mark.parametrize("answer, message", [((1, "", "Unit libvirtd.service not found."),
                                              "systemctl restart libvirtd failed: Unit libvirtd.service not found."),
                                             ((1, "only stdout", ""), "failed: only stdout")])
def test_a_failed_systemd_restart_says_why(tmp_path, answer, message):
    commands = FakeCommands({"systemctl restart": [answer]})
    with pytest.raises(LibvirtHostError, match=message):
        daemon(commands, tmp_path / "pid").restart("systemd")


def test_a_pidfile_restart_with_no_daemon_starts_one(tmp_path):
    commands = FakeCommands()
    result = daemon(commands, tmp_path / "pid").restart("pidfile")
    assert result == {"pid_before": None, "pid_after": None}
    assert ["/fake/libvirtd", "-d"] in commands.calls
    assert ("libvirtd", True, ["/usr/sbin", "/sbin"]) in commands.bin_paths


def test_a_pidfile_restart_stops_the_daemon_and_starts_it_with_its_own_arguments(tmp_path, sleeper):
    pidfile = tmp_path / "libvirtd.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    commands = FakeCommands()
    result = daemon(commands, pidfile).restart("pidfile")
    assert result["pid_before"] == sleeper.pid
    assert result["pid_after"] is None  # the fake started nothing; the old one is gone
    assert not os.path.exists(f"/proc/{sleeper.pid}")
    assert ["/fake/libvirtd", "-e", "sleep 30", "--", "--listen", "-d"] in commands.calls


@pytest.mark.parametrize("flag", ["-d", "--daemon"])
def test_a_daemonized_command_line_is_kept_as_it_was(tmp_path, flag):
    binary = tmp_path / "libvirtd"
    shutil.copy(shutil.which("perl") or "/usr/bin/perl", binary)
    proc = started([str(binary), "-e", "sleep 30", "--", flag])
    try:
        assert daemon(FakeCommands(), tmp_path / "pid")._command_line(proc.pid) == [
            "/fake/libvirtd", "-e", "sleep 30", "--", flag]
    finally:
        proc.kill()
        proc.wait()
    assert daemon(FakeCommands(), tmp_path / "pid")._command_line(gone_pid()) == ["/fake/libvirtd", "-d"]


def test_a_failed_start_says_the_command_and_its_error(tmp_path):
    commands = FakeCommands({"libvirtd": [(6, "", "cannot bind 16514")]})
    with pytest.raises(LibvirtHostError, match=r"^/fake/libvirtd -d failed \(rc 6\): cannot bind 16514$"):
        daemon(commands, tmp_path / "pid").restart("pidfile")


def test_a_daemon_that_never_answers_times_out(tmp_path):
    commands = FakeCommands({"virsh": [(1, "", "no")]})
    with pytest.raises(LibvirtHostError, match=f"waiting for libvirtd to answer on {URI}"):
        daemon(commands, tmp_path / "pid", timeout=0.6).restart("pidfile")


def test_stopping_a_process_that_is_gone_is_done(tmp_path):
    daemon(FakeCommands(), tmp_path / "pid")._stop(gone_pid())


# -- reloading the VNC certificates -----------------------------------------------------------------
@pytest.mark.parametrize("servers, tls", [
    ([{"vencrypt": "x509-vnc"}], True), ([{"auth": "vnc"}, {"vencrypt": "x509-sasl"}], True),
    ([{"vencrypt": "tls-none"}], False), ([{"auth": "none"}], False), ([], False),
])
def test_a_vnc_server_uses_tls_certificates_when_its_vencrypt_is_x509(servers, tls):
    assert vnc_tls_enabled(servers) is tls


class QmpAnswers(FakeCommands):
    """virsh list and qemu-monitor-command answered per domain."""

    def __init__(self, servers: dict[str, Any], listed: str = "") -> None:
        super().__init__()
        self.servers = servers
        self.listed = listed

    def run(self, argv: list[str], **kwargs: Any) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        if argv[3] == "list":
            return 0, self.listed, ""
        answer = self.servers[argv[4]]
        if isinstance(answer, tuple):
            return answer
        return 0, json.dumps({"return": answer}), ""


def reloader(commands: FakeCommands) -> VncCertificateReload:
    return VncCertificateReload(commands.run, commands.get_bin_path, uri=URI)


def test_the_running_domains_are_virshs_list_without_blank_lines():
    commands = QmpAnswers({}, listed="web1\n\n  db 2  \n\n")
    assert reloader(commands).running_domains() == ["web1", "db 2"]
    assert commands.calls == [["/fake/virsh", "-c", URI, "list", "--name"]]


def test_domains_that_cannot_be_listed_fail_naming_the_daemon():
    commands = FakeCommands({"virsh": [(1, "", "failed to connect to the hypervisor")]})
    with pytest.raises(LibvirtHostError, match=f"^cannot list the domains on {URI}: failed to connect"):
        reloader(commands).running_domains()


def test_the_plan_reloads_tls_consoles_and_says_why_each_other_one_is_left_alone():
    commands = QmpAnswers({"tls": [{"vencrypt": "x509-vnc"}], "plain": [{"auth": "none"}],
                           "gone": (1, "", "error: Domain not found\n"), "garbled": (0, "not json", "")},
                          listed="tls\nplain\ngone\ngarbled\n")
    with_tls, skipped = reloader(commands).plan(None)
    assert with_tls == ["tls"]
    assert skipped == {"plain": "its VNC server does not use TLS certificates",
                       "gone": "cannot query its VNC server: error: Domain not found",
                       "garbled": skipped["garbled"]}
    assert skipped["garbled"].startswith("cannot query its VNC server: ")
    assert ["/fake/virsh", "-c", URI, "qemu-monitor-command", "tls", '{"execute": "query-vnc-servers"}'] \
        in commands.calls
    # named domains: no listing
    commands = QmpAnswers({"tls": [{"vencrypt": "x509-vnc"}]})
    assert reloader(commands).plan(["tls"]) == (["tls"], {})
    assert not [call for call in commands.calls if "list" in call]


def test_a_reload_asks_qemu_to_reread_the_vnc_certificates():
    commands = QmpAnswers({"web1": {}})
    reloader(commands).reload("web1")
    [call] = commands.calls
    assert call[:5] == ["/fake/virsh", "-c", URI, "qemu-monitor-command", "web1"]
    assert json.loads(call[5]) == {"execute": "display-reload", "arguments": {"type": "vnc", "tls-certs": True}}
    failing = QmpAnswers({"web1": (1, "", "  error: command display-reload not found \n")})
    with pytest.raises(LibvirtHostError, match="^error: command display-reload not found$"):
        reloader(failing).reload("web1")
