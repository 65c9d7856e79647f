"""Fixtures shared by the integration tests: real libvirt session daemons with tiny domains,
the source's log, and ansible-rulebook runs of the test rulebooks."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.hypervisor import SessionHypervisor, heal_event_delivery
from lab.leftovers import remove_dead_owners
from lab.rulebook_runner import ROOT, VENV_BIN
from lab.source_log import SourceLog

TEST_RULEBOOKS = Path(__file__).resolve().parent / "rulebooks"


@pytest.fixture(scope="session", autouse=True)
def no_dead_runs_leftovers() -> None:
    """Users, namespaces, links, tables and directories that a killed earlier run left (their
    owner is gone) would take this run's traffic or refuse its clients: removed first."""
    remove_dead_owners(print)


@pytest.fixture(scope="session")
def hypervisor():
    """A session daemon with two paused domains, for the whole test run."""
    hv = SessionHypervisor("a").start()
    hv.domains = [hv.create_domain(f"{hv.user}-d{n}") for n in range(2)]
    yield hv
    hv.stop()


@pytest.fixture(scope="session")
def second_hypervisor():
    hv = SessionHypervisor("b").start()
    hv.domains = [hv.create_domain(f"{hv.user}-d0")]
    yield hv
    hv.stop()


@pytest.fixture(scope="session", autouse=True)
async def settle_libvirt_callbacks():
    """libvirt frees closed connections lazily and may still call back on the loop (the
    source's wake-ups, libvirtaio in a subprocess test): let that run before pytest closes
    the loop, not at exit."""
    yield
    gc.collect()
    await asyncio.sleep(0.5)


@pytest.fixture(autouse=True)
def shared_hypervisors_relay_events(request):
    """The session-wide daemons are shared by many tests: before each, check that they still
    relay events to a new listener and heal them if a libvirt race left their event queue
    stuck (lab.hypervisor.relays_events), so one test cannot blind the next."""
    for name in ("hypervisor", "second_hypervisor"):
        if name in request.fixturenames:
            hv = request.getfixturevalue(name)
            heal_event_delivery(hv.uri, hv.domains[0].name)


@pytest.fixture
def source_log(caplog: pytest.LogCaptureFixture) -> SourceLog:
    """The event source's log in this test: wait for what it says it did (lab.source_log)."""
    return SourceLog(caplog)


class RulebookProcess:
    """ansible-rulebook on one of the test rulebooks (tests/integration/rulebooks), with the
    collection from build/collections, in a process group of its own; its output goes to a log."""

    def __init__(self, rulebook: str, variables: dict[str, Any], workdir: Path) -> None:
        (workdir / "inventory.yml").write_text("all:\n  hosts:\n    localhost:\n")
        (workdir / "vars.yml").write_text(yaml.safe_dump(variables))
        self.log = workdir / f"{rulebook}.log"
        env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
                   ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "ansible-rulebook"), "-r", str(TEST_RULEBOOKS / f"{rulebook}.yml"),
                 "-i", "inventory.yml", "--vars", "vars.yml", "-v"],
                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, done: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        """The output, once ``done(output)``; AssertionError (with the output) if ansible-rulebook
        exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not done(output := self.output()):
            assert self.proc.poll() is None, \
                f"ansible-rulebook exited ({self.proc.returncode}) before {what}:\n{output[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout:g}s:\n{output[-4000:]}"
            time.sleep(0.2)
        return output

    def stop(self) -> None:
        """SIGINT (as Ctrl-C), then SIGKILL for whatever of its process group is left."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def rulebook_process(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any]], RulebookProcess]]:
    """``rulebook_process(NAME, VARIABLES)`` starts ansible-rulebook on
    tests/integration/rulebooks/NAME.yml; every one started is stopped after the test."""
    started: list[RulebookProcess] = []

    def start(rulebook: str, variables: dict[str, Any]) -> RulebookProcess:
        workdir = tmp_path / f"rulebook-{len(started)}"
        workdir.mkdir()
        started.append(RulebookProcess(rulebook, variables, workdir))
        return started[-1]

    yield start
    for process in started:
        process.stop()
