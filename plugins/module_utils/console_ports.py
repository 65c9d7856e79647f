# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TCP ports this host's QEMU processes listen on: the real console ports.

libvirt gives VNC ports from 5900 up to 65535 (autoport), VNC websockets from 5700, and SPICE a
second port for TLS; a guessed range misses some of them. The listening sockets themselves are
the truth: ``ss -t -l -n -p -H`` lists each with the processes that hold it, e.g.::

    LISTEN 0      1      0.0.0.0:5907 0.0.0.0:* users:(("qemu-system-x86",pid=16890,fd=16))

A socket counts when one of its processes' names matches a console process pattern (by default
``qemu-system-*`` and ``qemu-kvm``). The name is the kernel's ``comm``, cut to 15 characters
(``qemu-system-x86`` for qemu-system-x86_64), so patterns should end with ``*`` or be short.
Every TCP port of such a process counts (graphics, and also a chardev, NBD or migration
listener): blocking an offender from those is harmless, missing a console port is not.

Needs root (or CAP_NET_ADMIN and ptrace rights): without them ``ss -p`` shows no processes.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable, NamedTuple, Sequence

from ansible_collections.virtguard.console.plugins.module_utils.host_commands import Run
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import (
    format_port_ranges,
    parse_port_ranges,
)
from ansible_collections.virtguard.console.plugins.module_utils.ss_endpoints import parse_endpoint

DEFAULT_CONSOLE_PROCESSES: tuple[str, ...] = ("qemu-system-*", "qemu-kvm")
SS_LISTENING: list[str] = ["ss", "-t", "-l", "-n", "-p", "-H"]

# One process of the users:((...)) column: ("name",pid=123,fd=4)
_USER = re.compile(r'\("((?:[^"\\]|\\.)*)",pid=(\d+),fd=(\d+)\)')


class PortDiscoveryError(Exception):
    """``ss`` could not list the listening sockets."""


class Listener(NamedTuple):
    """A listening TCP socket: its local address and port as ss prints them (the address
    without brackets or interface: ss_endpoints), and the names of the processes that hold it
    (empty when ss shows none)."""

    address: str
    port: int
    processes: tuple[str, ...]


def parse_listening(output: str) -> list[Listener]:
    """The lines of ``ss -t -l -n -p -H`` (State Recv-Q Send-Q Local Peer [Process])."""
    listeners: list[Listener] = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] != "LISTEN":
            continue
        local = parse_endpoint(fields[3])
        if local.port is None:
            continue
        users = line.partition("users:(")[2]
        names = tuple(match.group(1) for match in _USER.finditer(users))
        listeners.append(Listener(local.address, local.port, names))
    return listeners


def is_console_process(name: str, patterns: Sequence[str] = DEFAULT_CONSOLE_PROCESSES) -> bool:
    """Whether a process name matches one of the (fnmatch, case-sensitive) patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def console_ports_of(listeners: Iterable[Listener],
                     patterns: Sequence[str] = DEFAULT_CONSOLE_PROCESSES) -> set[int]:
    """The ports of the listeners held by a console process."""
    return {listener.port for listener in listeners
            if any(is_console_process(name, patterns) for name in listener.processes)}


def read_listeners(run: Run) -> list[Listener]:
    """This host's listening TCP sockets, through ``run(argv) -> (rc, out, err)``."""
    rc, out, err = run(list(SS_LISTENING))
    if rc != 0:
        raise PortDiscoveryError(f"{' '.join(SS_LISTENING)} failed (rc {rc}): {err.strip()}")
    return parse_listening(out)


def qemu_listening_ports(run: Run, processes: Sequence[str] = DEFAULT_CONSOLE_PROCESSES) -> set[int]:
    """The TCP ports on which this host's QEMU processes (or ``processes``) listen."""
    return console_ports_of(read_listeners(run), processes)


def ports_to_protect(run: Run, configured: Iterable[int | str], discover: bool,
                     processes: Sequence[str] = DEFAULT_CONSOLE_PROCESSES) -> tuple[list[str], set[int], str | None]:
    """The ports a block or cut acts on: the ``configured`` ones (checked; AddressError if
    wrong) and, with ``discover``, every port the console processes listen on. Returns the ports
    as nft/ss port strings, the discovered ports, and a warning when discovery failed (the
    configured and already protected ports still count: acting on them matters more)."""
    ports = format_port_ranges(parse_port_ranges(list(configured)))
    if not discover:
        return ports, set(), None
    try:
        discovered = qemu_listening_ports(run, processes)
    except PortDiscoveryError as exc:
        return ports, set(), f"console ports not discovered, using the configured and already protected ones: {exc}"
    return ports + [str(port) for port in sorted(discovered)], discovered, None
