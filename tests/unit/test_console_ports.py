"""Finding the console ports from ss's listening sockets (module_utils.console_ports), with
outputs captured from ss on a host running QEMU and fake listeners."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.console_ports import (
    SS_LISTENING,
    Listener,
    PortDiscoveryError,
    console_ports_of,
    is_console_process,
    parse_listening,
    qemu_listening_ports,
)

FIXTURES = Path(__file__).parent / "fixtures" / "console_remediation"
QEMU = (FIXTURES / "ss_listening_qemu.txt").read_text()   # QEMU 7.2: VNC, VNC websocket, SPICE
MIXED = (FIXTURES / "ss_listening.txt").read_text()       # two "qemu-system-x86" listeners and an sshd


def test_listeners_are_read_with_their_processes():
    assert parse_listening(QEMU) == [Listener("0.0.0.0", 5787, ("qemu-system-x86",)),
                                     Listener("0.0.0.0", 5907, ("qemu-system-x86",)),
                                     Listener("*", 5930, ("qemu-system-x86",))]
    shared = 'LISTEN 0 1 [::]:5901 [::]:* users:(("other",pid=1,fd=3),("qemu-kvm",pid=2,fd=4))\n'
    assert parse_listening(shared) == [Listener("::", 5901, ("other", "qemu-kvm"))]
    assert parse_listening("LISTEN 0 1 0.0.0.0:5902 0.0.0.0:*\n") == [Listener("0.0.0.0", 5902, ())]
    assert parse_listening("garbage\n\nESTAB 0 0 1.2.3.4:5 6.7.8.9:10\n") == []


def test_only_console_processes_count():
    assert console_ports_of(parse_listening(MIXED)) == {5907, 5908}
    assert console_ports_of(parse_listening(MIXED), ["sshd"]) == {22}
    assert console_ports_of(parse_listening(QEMU)) == {5787, 5907, 5930}
    assert is_console_process("qemu-system-aar") and is_console_process("qemu-kvm")
    assert not is_console_process("qemu-img") and not is_console_process("xqemu-system-x86")


def test_qemu_listening_ports_runs_ss_once_and_reports_its_failure():
    calls = []

    def run(argv, data=None):
        calls.append(argv)
        return 0, QEMU, ""

    assert qemu_listening_ports(run) == {5787, 5907, 5930}
    assert calls == [SS_LISTENING]
    with pytest.raises(PortDiscoveryError, match="Cannot open netlink"):
        qemu_listening_ports(lambda argv, data=None: (1, "", "Cannot open netlink socket"))
