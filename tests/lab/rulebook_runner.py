"""Runs a shipped rulebook with the real ansible-rulebook, as a user would
(``ansible-rulebook -r virtguard.console.NAME -i INVENTORY --vars VARS``), in its own process
group so that stopping it also stops the playbook runs it started, and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


def local_inventory() -> dict[str, Any]:
    """localhost, run locally with the virtualenv's Python (which has the collection's deps)."""
    return {"all": {"hosts": {"localhost": {"ansible_connection": "local",
                                            "ansible_python_interpreter": sys.executable}}}}


class RulebookRun:
    def __init__(self, rulebook: str, variables: dict[str, Any], workdir: Path, inventory: dict[str, Any] | None = None,
                 extra_args: list[str] | None = None):
        self.rulebook = rulebook
        self.extra_args = extra_args or []
        self.variables = variables
        self.workdir = Path(workdir)
        self.inventory = inventory or local_inventory()
        self.log_path = self.workdir / f"{rulebook}.log"
        self.tmpdir = self.workdir / "tmp"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_text: str = "watching graphics events", timeout: float = 90) -> RulebookRun:
        self.workdir.mkdir(parents=True, exist_ok=True)
        vars_file = self.workdir / "vars.yml"
        inventory_file = self.workdir / "inventory.yml"
        vars_file.write_text(yaml.safe_dump(self.variables))
        inventory_file.write_text(yaml.safe_dump(self.inventory))
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env["ANSIBLE_COLLECTIONS_PATH"] = str(ROOT / "build" / "collections")
        env["ANSIBLE_LOCALHOST_WARNING"] = "false"
        # ansible-rulebook makes a private data directory for each playbook run there and
        # leaves it behind when stopped mid-run: stop() removes the whole directory
        self.tmpdir.mkdir(exist_ok=True)
        env["TMPDIR"] = str(self.tmpdir)
        with open(self.log_path, "wb") as log:  # the process writes to its own copy of the descriptor
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "ansible-rulebook"), "-r", f"virtguard.console.{self.rulebook}",
                 "-i", str(inventory_file), "--vars", str(vars_file), "-v", *self.extra_args],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for_log(ready_text, timeout)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        assert self.proc is not None, "the activation was not started"
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"ansible-rulebook exited ({self.proc.returncode}):\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the ansible-rulebook log after {timeout}s:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.2)

    def playbook_runs_left(self) -> list[str]:
        """The command lines of the activation's ansible-playbook processes still running."""
        assert self.proc is not None, "the activation was not started"
        left = []
        for pid in descendants_of(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "ansible-playbook" in cmdline:
                left.append(f"{pid}: {cmdline[:200]}")
        return left

    def stop(self) -> None:
        if self.proc is None:
            return
        # ansible-runner starts ansible-playbook in a session of its own (a pty): remember every
        # descendant now, so a playbook run cannot outlive the test and write after its cleanup
        descendants = descendants_of(self.proc.pid)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
            except ProcessLookupError:
                pass
        # playbook runs still going in the group (only ever ours)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.proc = None


def descendants_of(root: int) -> list[int]:
    """Every process below ``root``, whatever session or group it moved to (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
