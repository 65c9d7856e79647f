"""A system libvirtd for the host-role tests, on a fleet host of its own (lab.fleet.FleetHost:
own network, mount and UTS namespaces and /etc, reached over SSH as Ansible reaches a
hypervisor), set up as a host the roles have never seen. The roles rewrite qemu.conf, /etc/pki
and /etc/sasl2 and restart libvirtd, all inside the host, whatever the machine runs (its own
system libvirtd included).

Beyond a fleet host's own setup:
- qemu.conf holds only what any system domain needs on this machine kind, then the settings the
  test gives (an operator's): ``security_driver = "none"`` (nothing relabels files for QEMU,
  so certificates and the sasldb must be readable by the QEMU account's group) and
  ``namespaces = []``. QEMU runs as ``libvirt-qemu``, as the packaged driver has it, so a file
  the roles leave unreadable to that group fails the domain or the login.
- /dev/kvm is the machine's device, open to the QEMU account's group: as ``crw------- root``,
  libvirt's capability probe (root) finds KVM while QEMU cannot use it, judges its cache stale
  at every domain start and probes QEMU again (about 44 s a start instead of 0.5 s).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

from lab.fleet import FleetHost
from lab.hypervisor import Domain

QEMU_CONF = "/etc/libvirt/qemu.conf"
BASE_QEMU_CONF = 'security_driver = "none"\nnamespaces = []\n'
QEMU_ACCOUNT = "libvirt-qemu"
KVM = Path("/dev/kvm")


class SystemLibvirtd:
    """``SystemLibvirtd(extra_qemu_conf).start()``: a fleet host whose qemu.conf is
    BASE_QEMU_CONF followed by ``extra_qemu_conf``; ``stop()`` removes the host and all in it."""

    def __init__(self, extra_qemu_conf: str = "") -> None:
        self.host = FleetHost()
        self.extra_qemu_conf = extra_qemu_conf
        self.uri = self.host.local_uri  # from the machine; qemu:///system inside the host

    def start(self) -> SystemLibvirtd:
        self.host.start()
        try:
            self._kvm_for_qemu_account()
            conf = self.host.path(QEMU_CONF)
            conf.write_text(BASE_QEMU_CONF + self.extra_qemu_conf)
            os.chmod(conf, 0o600)
            self.host.kill_libvirtd(signal.SIGTERM)  # it started with the fleet host's qemu.conf
            self.host.start_libvirtd()
        except BaseException:
            self.host.stop()
            raise
        return self

    def _kvm_for_qemu_account(self) -> None:
        if not KVM.exists():
            return
        device = self.host.root / "kvm"
        os.mknod(device, stat.S_IFCHR | 0o600, KVM.stat().st_rdev)
        group = self.host.run(["getent", "group", QEMU_ACCOUNT]).stdout.split(":")[2]
        os.chown(device, 0, int(group))
        os.chmod(device, 0o660)
        self.host.run(["mount", "--bind", str(device), str(KVM)])

    def pid(self) -> int | None:
        return self.host.libvirtd_pid()

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.virsh(*args, check=check)

    def create_domain(self, name: str) -> Domain:
        """A tiny paused domain whose VNC server listens where qemu.conf says (vnc_listen)."""
        return self.host.create_domain(name)

    def stop(self) -> None:
        self.host.stop()
