#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vnc_display_reload
short_description: Make running QEMU domains reload their VNC TLS certificates
version_added: 0.1.0
description:
  - A QEMU domain reads its VNC certificates (C(vnc_tls_x509_cert_dir)) when it starts and keeps
    them until it stops. This module sends QEMU's C(display-reload) command (QEMU 6.0 and
    later) to each running domain whose VNC server uses TLS certificates, so renewed or
    re-issued certificates take effect without restarting the domain.
  - It goes through C(virsh qemu-monitor-command), so libvirt marks each reloaded domain as
    tainted (C(custom-monitor)) in its log; nothing else changes.
  - Domains whose VNC server does not use TLS (for instance started before C(vnc_tls) was
    enabled) are skipped; only a restart gives them TLS.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
attributes:
  check_mode:
    support: full
    details: Lists the domains it would reload.
  diff_mode:
    support: none
options:
  domains:
    description: The domains to reload; empty means every running domain on O(uri).
    type: list
    elements: str
    default: []
  uri:
    description: The libvirt connection.
    type: str
    default: qemu:///system
"""

EXAMPLES = r"""
- name: Reload the VNC certificates of every running domain
  virtguard.console.vnc_display_reload:
"""

RETURN = r"""
reloaded:
  description: The domains that reloaded (or in check mode would reload) their certificates.
  returned: always
  type: list
  elements: str
skipped:
  description: The other domains, each with the reason.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.libvirt_host import (
    LibvirtHostError,
    VncCertificateReload,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            domains=dict(type="list", elements="str", default=[]),
            uri=dict(type="str", default="qemu:///system"),
        ),
        supports_check_mode=True,
    )
    reloader = VncCertificateReload(module.run_command, module.get_bin_path,
                                    uri=module.params["uri"])
    try:
        domains, skipped = reloader.plan(module.params["domains"])
    except LibvirtHostError as exc:
        module.fail_json(msg=str(exc))
    failed = {}
    if not module.check_mode:
        for domain in domains:
            try:
                reloader.reload(domain)
            except LibvirtHostError as exc:
                failed[domain] = str(exc)
    reloaded = [domain for domain in domains if domain not in failed]
    if failed:
        module.fail_json(msg=f"display-reload failed on {', '.join(sorted(failed))}",
                         failed_domains=failed, reloaded=reloaded, skipped=skipped,
                         changed=bool(reloaded))
    module.exit_json(changed=bool(reloaded), reloaded=reloaded, skipped=skipped)


if __name__ == "__main__":
    main()
