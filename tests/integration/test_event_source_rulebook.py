"""The event source run by ansible-rulebook itself, with a small rulebook."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lab import rfb
from lab.rulebook_runner import ROOT, VENV_BIN

pytestmark = pytest.mark.slow
RULEBOOK = Path(__file__).parent / "rulebooks" / "print_console_events.yml"


def test_ansible_rulebook_runs_the_source_and_matches_events(hypervisor, tmp_path):
    (tmp_path / "inventory.yml").write_text("all:\n  hosts:\n    localhost:\n")
    (tmp_path / "vars.yml").write_text(f"virtguard_uri: '{hypervisor.uri}'\n")
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"))
    log = tmp_path / "rulebook.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "ansible-rulebook"), "-r", str(RULEBOOK), "-i", "inventory.yml",
                                 "--vars", "vars.yml", "-v"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "watching graphics events" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        sock = rfb.open_session("127.0.0.1", hypervisor.domains[0].vnc_port)
        client_port = str(sock.getsockname()[1])
        sock.close()
        deadline = time.monotonic() + 30
        while log.read_text(errors="replace").count(f"'service': '{client_port}'") < 3:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text(errors="replace")
    # print_event prints an event only when its rule matched: one per phase
    for phase in ("connect", "initialize", "disconnect"):
        assert f"'phase': '{phase}'" in output
