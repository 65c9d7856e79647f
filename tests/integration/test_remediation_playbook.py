"""The remediation playbook run by ansible-playbook as ansible-rulebook runs it: the event in
the extra vars (plain YAML, nothing marked unsafe), with hostile certificate names in both
forms (Jinja that would run a command, and text with ``{{`` that is not valid Jinja)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.rulebook_runner import ROOT, VENV_BIN, local_inventory

pytestmark = pytest.mark.slow

MARKER = Path(f"/tmp/virtguard-pw{os.getpid()}")
HOSTILE = {
    "renderable": f"O=x,CN={{{{ lookup(*'pipe~touch {MARKER}'.split('~')) }}}}",
    "broken": "O=x,CN={{ broken ~ (",
}


def eda_extra_vars(dname: str, address: str, table: str = "virtguard_unused", audit_log: str = "") -> dict[str, Any]:
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
                 ) -> subprocess.CompletedProcess[str]:
    (tmp_path / "extravars").write_text(yaml.safe_dump(extra_vars))  # as ansible-rulebook writes it
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(local_inventory()))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"))
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.yml"),
                           "-e", f"@{tmp_path / 'extravars'}", playbook, *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)


@pytest.fixture
def table():
    name = f"virtguard_p{os.getpid()}"
    yield name
    subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, check=False)
    MARKER.unlink(missing_ok=True)


def test_the_hostile_input_is_live(tmp_path, table):
    """Control: a playbook that touches the identity does run the command (ansible-core 2.19)."""
    (tmp_path / "naive.yml").write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.debug:\n        msg: \"{{ ansible_eda.event.graphics.identity.x509dname }}\"\n")
    run_playbook(tmp_path, "naive.yml", eda_extra_vars(HOSTILE["renderable"], "192.0.2.10"))
    assert MARKER.exists()


@pytest.mark.parametrize("form", sorted(HOSTILE))
def test_remediation_with_a_hostile_identity_renders_nothing_and_succeeds(tmp_path, table, form):
    audit = tmp_path / "audit.jsonl"
    extra = eda_extra_vars(HOSTILE[form], "192.0.2.11", table, str(audit))

    check = run_playbook(tmp_path, "virtguard.console.remediate_console", extra, "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert not audit.exists()
    assert subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, check=False).returncode != 0

    done = run_playbook(tmp_path, "virtguard.console.remediate_console", extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not MARKER.exists()
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["action"], r["ok"]) for r in records] == [("block", True), ("cut", True)]
    assert ipaddress.ip_network(records[0]["result"]["blocked"][0]["network"]) == ipaddress.ip_network("192.0.2.11/32")
    assert records[0]["addresses"] == ["192.0.2.11"] and records[0]["sessions"] == ["0123abcd"]
    assert records[1]["result"]["cut"] == []  # nobody connected from there
    listing = subprocess.run(["nft", "list", "set", "inet", table, "blocked_ipv4"], capture_output=True, text=True,
                             check=False)
    assert "192.0.2.11" in listing.stdout
