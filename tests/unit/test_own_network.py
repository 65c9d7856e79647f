"""The suite runs in a network namespace of its own (tests/lab/own_network.py), so that the
machine's firewall cannot see the lab."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.own_network import ENTERED, STAY, enter_own_network

TESTS = Path(__file__).resolve().parents[1]


def namespace(pid: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.mark.skipif(os.environ.get(STAY) == "1", reason=f"{STAY}=1: the run stays in the machine's namespace")
def test_the_suite_is_not_in_the_machines_network_namespace_and_has_loopback() -> None:
    assert os.environ[ENTERED].startswith("net:[")  # the namespace left, as /proc names it
    assert namespace("self") != os.environ[ENTERED]
    link = subprocess.run(["ip", "-o", "link", "show", "lo"], capture_output=True, text=True, check=True).stdout
    assert "UP" in link.split("<", 1)[1].split(">", 1)[0].split(",")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    ours = {line.split(": ")[1].split("@")[0] for line in links.splitlines()}
    # /sys was mounted in the machine's namespace, so it lists the machine's interfaces
    machines = set(os.listdir("/sys/class/net")) - {"lo"}
    assert machines and not machines & ours, (machines, ours)
    assert enter_own_network() is False  # entered once: a second call moves nothing


def run_alone(code: str, wrapper: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh Python that imports lab, without the suite's marker, started through
    ``wrapper`` (a command that runs the rest of its arguments) if given."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENTERED, STAY)} | (env or {})
    return subprocess.run([*wrapper, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); {code}"],
                          capture_output=True, text=True, env=environ, check=False, timeout=60)


def test_a_process_moves_into_a_namespace_of_its_own_and_the_machines_stays_when_asked() -> None:
    probe = ("from lab.own_network import enter_own_network; import os; before = os.readlink('/proc/self/ns/net'); "
             "print(enter_own_network(), before != os.readlink('/proc/self/ns/net'))")
    assert run_alone(probe).stdout.split() == ["True", "True"]
    assert run_alone(probe, env={STAY: "1"}).stdout.split() == ["False", "False"]


def test_a_process_with_threads_is_refused_loudly() -> None:
    code = ("import threading, time; threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); "
            "from lab.own_network import enter_own_network; enter_own_network()")
    result = run_alone(code)
    assert result.returncode != 0
    assert "RuntimeError: cannot enter the suite's own network namespace: 2 threads run" in result.stderr


def test_a_process_that_may_not_make_namespaces_is_refused_loudly() -> None:
    """Without CAP_SYS_ADMIN (root with every capability dropped, as in a locked-down container)
    the suite stops at once with the reason, never runs in the machine's namespace unasked."""
    result = run_alone("from lab.own_network import enter_own_network; enter_own_network()",
                       ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--"))
    assert result.returncode != 0
    assert ("PermissionError: [Errno 1] cannot enter the suite's own network namespace (unshare: Operation not "
            f"permitted); run as root, or set {STAY}=1 to run in the machine's") in result.stderr
