"""What one bench run builds and must remove: session daemons (tests/lab), their domains and
users, and the processes the bench starts. ``with Lab() as lab:`` removes all of it on the way
out, also on an exception, Ctrl-C (SIGINT) or SIGTERM; it only ever stops what it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import ROOT
from lab.hypervisor import Domain, SessionHypervisor
from lab.leftovers import remove_dead_owners

# VNC ports: each daemon gets its own range, above the 5900+ that other suites' daemons use,
# because session daemons allocate ports independently and race when started side by side.
PORT_BASE = 20000
PORTS_PER_HYPERVISOR = 250


class BenchHypervisor(SessionHypervisor):
    """A session daemon of the bench, with the paused domains the bench made on it."""

    def __init__(self, tag: str, qemu_conf: str) -> None:
        super().__init__(tag, qemu_conf=qemu_conf)
        self.domains: list[Domain] = []


class Lab:
    def __init__(self, log: Callable[[str], object] = print):
        self.log = log
        self.hypervisors: list[SessionHypervisor] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self._next_range = 0

    def __enter__(self) -> Lab:
        self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        remove_dead_owners(lambda line: self.log(f"# {line}"))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            signal.signal(signal.SIGTERM, self._old_term)

    # -- hypervisors -----------------------------------------------------------------------
    def hypervisors_with_domains(self, tag: str, count: int, domains_each: int,
                                 threads: int = 4) -> list[BenchHypervisor]:
        """``count`` session daemons with ``domains_each`` paused domains each, built in parallel."""
        made: list[BenchHypervisor] = []
        for n in range(count):
            low = PORT_BASE + self._next_range * PORTS_PER_HYPERVISOR
            self._next_range += 1
            conf = (f'vnc_listen = "127.0.0.1"\nremote_display_port_min = {low}\n'
                    f"remote_display_port_max = {low + PORTS_PER_HYPERVISOR - 1}\n")
            hv = BenchHypervisor(f"{tag}{n}", qemu_conf=conf)
            self.hypervisors.append(hv)  # registered first: stop() cleans up a half-started one
            made.append(hv)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda hv: hv.start(), made))
            jobs = [(hv, f"{hv.user}-d{i}") for i in range(domains_each) for hv in made]
            for hv, domain in zip([j[0] for j in jobs], pool.map(lambda j: j[0].create_domain(j[1]), jobs),
                                  strict=True):
                hv.domains.append(domain)
        return made

    def release(self, hypervisors: Sequence[SessionHypervisor]) -> None:
        """Stop some hypervisors now (memory for the next measurement)."""
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(_stop_quietly, hypervisors))
        self.hypervisors = [hv for hv in self.hypervisors if hv not in hypervisors]

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """A child in its own session (its own process group), stopped by close()."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(kwargs.pop("env", {}))
        proc = subprocess.Popen(args, cwd=kwargs.pop("cwd", ROOT), env=env, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_process(self, proc: subprocess.Popen[Any], grace: float = 10) -> None:
        if proc.poll() is None:
            for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        try:  # what is left of its group (playbook runs of ansible-rulebook): only ever ours
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        # Ctrl-C during cleanup would leave daemons and users behind: finish first.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in list(self.procs):
                self.stop_process(proc, grace=5)
            if self.hypervisors:
                started = time.monotonic()
                self.release(list(self.hypervisors))
                self.log(f"# cleanup: stopped the bench's hypervisors in {time.monotonic() - started:.1f}s")
        finally:
            signal.signal(signal.SIGINT, old_int)


def _stop_quietly(hv: SessionHypervisor) -> None:
    try:
        hv.stop()
    except Exception as exc:  # keep stopping the others
        print(f"# cleanup of {hv.user} failed: {exc}", file=sys.stderr)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
