"""The suite's own network namespace, so that the machine's network cannot change what a test sees.

Everything a test starts on "the machine" (session hypervisors and their consoles, the host ends
of client namespaces, ansible-rulebook and the remediation it runs on ``localhost``, the nft
tables and ``ss -K`` of those runs) lives in the network namespace of the pytest process. In the
machine's own namespace, the machine's nftables apply to all of it: a machine where this
collection's ``console_firewall`` role was applied (issue 21: the roles applied to the machine
itself) refuses the lab's clients, since they come from networks it does not allow, and a
firewall of any other kind would do the same. So the pytest process moves, before any test runs
and before it has any thread, into a new network namespace of its own with only ``lo`` up; the
lab builds its networks there as it did in the machine's. Processes started later inherit it;
named namespaces (client namespaces, fleet hosts) are made and entered as before. The namespace
has no name and goes when the last process in it ends: nothing is left on the machine.

``VIRTGUARD_TEST_MACHINE_NETWORK=1`` keeps the suite in the machine's namespace (to look at it
with the machine's tools while it runs). A pytest started by a test inherits the namespace and
the marker below, and stays where it is.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading

CLONE_NEWNET = 0x40000000
STAY = "VIRTGUARD_TEST_MACHINE_NETWORK"
ENTERED = "VIRTGUARD_TEST_OWN_NETWORK"  # set once entered, for the processes started since: the namespace left


def enter_own_network() -> bool:
    """Move this process into a new network namespace with ``lo`` up; False when it stays
    (asked to, or already in the suite's own). Raises when it cannot: a suite that ran in the
    machine's network unasked would depend on the machine's firewall."""
    if os.environ.get(STAY) == "1" or os.environ.get(ENTERED):
        return False
    if threading.active_count() != 1:
        # unshare moves the calling thread only: the others would stay in the machine's namespace
        raise RuntimeError(f"cannot enter the suite's own network namespace: {threading.active_count()} threads run")
    machine = os.readlink("/proc/self/ns/net")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot enter the suite's own network namespace (unshare: {os.strerror(errno)}); "
                             f"run as root, or set {STAY}=1 to run in the machine's")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ[ENTERED] = machine
    return True
