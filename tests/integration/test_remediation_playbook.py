"""The remediation playbook run by ansible-playbook as ansible-rulebook runs it: the event in
the extra vars (plain YAML, nothing marked unsafe), with hostile certificate names in both
forms (Jinja that would run a command, and text with ``{{`` that is not valid Jinja)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest

from lab.remediation_run import eda_extra_vars, run_playbook

pytestmark = pytest.mark.slow

MARKER = Path(f"/tmp/virtguard-pw{os.getpid()}")
HOSTILE = {
    "renderable": f"O=x,CN={{{{ lookup(*'pipe~touch {MARKER}'.split('~')) }}}}",
    "broken": "O=x,CN={{ broken ~ (",
}


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
