"""The remediation playbook run as ansible-rulebook runs it, without ansible-rulebook: the
event in the extra vars file (plain YAML, nothing marked unsafe, as ansible-rulebook writes it),
ansible-playbook from the virtualenv with the collection from build/collections, on localhost."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from lab.rulebook_runner import ROOT, VENV_BIN, local_inventory


def eda_extra_vars(dname: str, address: str, table: str = "virtguard_unused", audit_log: str = "") -> dict[str, Any]:
    """What ansible-rulebook hands the playbook for a batch of one offender at ``address`` whose
    certificate DN and SASL user name are ``dname``, to be blocked in nftables table ``table``."""
    graphics = {
        "phase": "initialize", "snapshot": False, "timestamp": "2025-01-01T00:00:00+00:00",
        "hypervisor": {"uri": "qemu:///system", "hostname": "h"},
        "domain": {"name": "vm", "uuid": "u", "id": 1},
        "local": {"family": "ipv4", "node": "0.0.0.0", "service": "5901"},
        "remote": {"family": "ipv4", "node": address, "service": "40000"},
        "auth_scheme": "vencrypt+x509+sasl",
        "subject": [{"type": "x509dname", "name": dname}, {"type": "saslUsername", "name": dname}],
        "identity": {"x509dname": dname, "sasl_username": dname},
        "session": {"id": "0123abcd", "authenticated": True},
    }
    entry = {"session_id": "0123abcd", "address": address, "network": f"{address}/32", "client_port": 40000,
             "console_port": 5901, "reasons": ["identity_not_allowed"]}
    virtguard = {"verdict": "cut", "reasons": ["identity_not_allowed"], "remediate": True, "queued": False,
                 "session_id": "0123abcd", "phase": "initialize", "snapshot": False,
                 "remote": {"family": "ipv4", "address": address, "port": 40000, "trusted": True,
                            "network": f"{address}/32"},
                 "local_port": 5901, "target_host": "localhost", "block_seconds": 30, "batch": [entry],
                 "remediation": {"networks": [f"{address}/32"], "console_ports": ["5901"], "nft_table": table,
                                 "set_size": 1024, "block_seconds": 30, "audit_log": audit_log}}
    return {"ansible_eda": {"event": {"graphics": graphics, "virtguard": virtguard, "meta": {"hosts": "localhost"}},
                            "rule": f"rule {dname}", "ruleset": "r"}}


def run_playbook(tmp_path: Path, playbook: str, extra_vars: dict[str, Any], *args: str,
                 timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """ansible-playbook PLAYBOOK with ``extra_vars`` on localhost, in a session of its own;
    past ``timeout`` seconds its whole process group (forks, modules) is killed and
    subprocess.TimeoutExpired raised."""
    (tmp_path / "extravars").write_text(yaml.safe_dump(extra_vars))  # as ansible-rulebook writes it
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(local_inventory()))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"))
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), "-e",
           f"@{tmp_path / 'extravars'}", playbook, *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
