#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: libvirtd_restart
short_description: Restart the system libvirt daemon, with or without systemd
version_added: 0.1.0
description:
  - Restarts the system C(libvirtd) so that it reads C(/etc/libvirt/qemu.conf) again, and waits
    until it answers on O(uri).
  - Under systemd (the host has C(/run/systemd/system)) through C(systemctl restart). Without
    it (containers, a plain C(libvirtd -d)) the pid in O(pidfile) is stopped with SIGTERM, and
    once it has exited C(libvirtd) is started again, daemonized, with the arguments the old
    process had. A daemon that is not running is started.
  - Running domains are not touched; libvirtd reconnects to them. They keep the VNC settings
    and certificates they started with.
  - The handlers of the C(virtguard.console.vnc_tls) and C(virtguard.console.vnc_sasl) roles
    call it with O(config_files), so two roles in one play restart the daemon once.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
attributes:
  check_mode:
    support: full
    details: Reports a restart without doing it.
  diff_mode:
    support: none
options:
  config_files:
    description:
      - Restart only when the running daemon started before one of these files last changed.
        A daemon started since then already runs with them.
      - Empty (the default) restarts unconditionally. Ignored in check mode.
    type: list
    elements: path
    default: []
  method:
    description:
      - V(auto) uses systemd when the host runs it, else the pidfile.
    type: str
    choices: [auto, systemd, pidfile]
    default: auto
  service:
    description: The systemd unit.
    type: str
    default: libvirtd
  pidfile:
    description: Where a daemon started without systemd writes its pid.
    type: path
    default: /run/libvirtd.pid
  uri:
    description: The connection that must answer (C(virsh -c URI version)) before the module returns.
    type: str
    default: qemu:///system
  timeout:
    description: Seconds to wait for the old daemon to exit, and again for the new one to answer.
    type: int
    default: 60
"""

EXAMPLES = r"""
- name: Restart libvirtd if qemu.conf changed since it started
  virtguard.console.libvirtd_restart:
    config_files:
      - /etc/libvirt/qemu.conf
"""

RETURN = r"""
method:
  description: How the daemon was (or would be) restarted.
  returned: always
  type: str
  sample: pidfile
pid_before:
  description: The daemon's pid before the restart, null when none ran.
  returned: when restarted
  type: int
pid_after:
  description: The daemon's pid after the restart.
  returned: when restarted
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.libvirt_host import (
    Libvirtd,
    LibvirtHostError,
    daemon_read_config,
    uses_systemd,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            config_files=dict(type="list", elements="path", default=[]),
            method=dict(type="str", choices=["auto", "systemd", "pidfile"], default="auto"),
            service=dict(type="str", default="libvirtd"),
            pidfile=dict(type="path", default="/run/libvirtd.pid"),
            uri=dict(type="str", default="qemu:///system"),
            timeout=dict(type="int", default=60),
        ),
        supports_check_mode=True,
    )
    params = module.params
    method = params["method"]
    if method == "auto":
        method = "systemd" if uses_systemd() else "pidfile"
    daemon = Libvirtd(module.run_command, module.get_bin_path, pidfile=params["pidfile"],
                      uri=params["uri"], service=params["service"], timeout=params["timeout"])
    if module.check_mode:
        module.exit_json(changed=True, method=method)
    if daemon_read_config(daemon.main_pid(method), params["config_files"]):
        module.exit_json(changed=False, method=method,
                         msg="libvirtd started after its configuration last changed")
    try:
        result = daemon.restart(method)
    except LibvirtHostError as exc:
        module.fail_json(msg=str(exc), method=method)
    module.exit_json(changed=True, method=method, **result)


if __name__ == "__main__":
    main()
