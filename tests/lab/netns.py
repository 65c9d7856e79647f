"""Console clients with addresses of their own: network namespaces joined to this host by a
veth pair, each on its own little subnet (IPv4 and IPv6), so that a test can play a trusted
and an untrusted client on one machine.

Sockets are opened *inside* a namespace from a worker thread that entered it with
``setns(2)`` (a network namespace is per thread), so tests keep the socket objects in-process;
``run()`` runs a command in the namespace (``ip netns exec``).

Every name carries the per-process prefix of ``lab.hypervisor`` and ``delete()`` removes the
namespace and both veth ends.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, Self, TypeVar

from lab.hypervisor import PREFIX, run

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def _enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _subnet_base(index: int) -> tuple[str, str]:
    """A /24 and a /64 unique to this process and index (100.64.0.0/10 is shared address
    space, never routed here). The subnet depends on the index only: one process must not use
    one index twice at a time, whatever the tags."""
    pid = os.getpid()
    second = 64 + pid % 64
    third = (pid // 64) % 8 * 32 + index % 32
    return f"100.{second}.{third}", f"fd7a:{pid % 65536:x}:{index}"


def _wait_for_link_local(show: list[str], timeout: float = 10.0) -> str:
    """The fe80:: address that ``ip -6 -o addr show dev X`` lists, once the kernel has made it."""
    deadline = time.monotonic() + timeout
    while True:
        for line in run(show).stdout.splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[3].startswith("fe80:") and "tentative" not in fields:
                return fields[3].split("/")[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no link-local address from {' '.join(show)}")
        time.sleep(0.05)


class VethNamespace:
    """A network namespace joined to this machine by a veth pair: the host's end has
    ``host_ip``/``prefix4`` and ``host_ip6``/64; ``create()`` makes it (``_configure`` adds what
    a kind of namespace needs before and after its links come up), ``delete()`` removes the
    namespace and both ends. ``call`` runs a function on a thread inside it."""

    workers = 4  # threads of ``call``

    def __init__(self, name: str, host_link: str, ns_link: str, host_ip: str, host_ip6: str, prefix4: int) -> None:
        self.name, self.host_link, self.ns_link = name, host_link[:15], ns_link[:15]
        self.host_ip, self.host_ip6, self.prefix4 = host_ip, host_ip6, prefix4
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def create(self) -> Self:
        self.delete()
        try:
            run(["ip", "netns", "add", self.name])
            run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link])
            run(["ip", "link", "set", self.ns_link, "netns", self.name])
            self._before_up()
            run(["ip", "addr", "add", f"{self.host_ip}/{self.prefix4}", "dev", self.host_link])
            run(["ip", "-6", "addr", "add", f"{self.host_ip6}/64", "dev", self.host_link, "nodad"])
            run(["ip", "link", "set", self.host_link, "up"])
            for cmd in self._namespace_addresses():
                self.run(cmd)
            self.run(["ip", "link", "set", self.ns_link, "up"])
            self.run(["ip", "link", "set", "lo", "up"])
            self._after_up()
        except BaseException:
            self.delete()
            raise
        return self

    def _before_up(self) -> None:
        """Before any address: settings the links need from the start."""

    def _namespace_addresses(self) -> list[list[str]]:
        """``ip`` commands (run in the namespace) that address its end before it comes up."""
        return []

    def _after_up(self) -> None:
        """Once both ends are up."""

    def delete(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        run(["ip", "netns", "del", self.name], check=False)
        run(["ip", "link", "del", self.host_link], check=False)

    def run(self, cmd: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.name, *cmd], check=check, **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a thread inside the namespace; sockets it opens (and threads it starts)
        belong there."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix=self.name, initializer=_enter_netns,
                initargs=(self.name,))
        return self._pool.submit(fn, *args, **kwargs).result()


class ClientNamespace(VethNamespace):
    """``ClientNamespace(index).create()``: host side ``host_ip``, client ``client_ip``.

    With ``link_local``, both veth ends come up without duplicate address detection, so their
    link-local addresses (``host_ll``, ``client_ll``) are usable at once; a client reaches the
    host at ``f"{host_ll}%{ns_link}"``."""

    def __init__(self, index: int, tag: str = "n", link_local: bool = False):
        if not 0 <= index < 32:
            raise ValueError("index must be 0..31")
        v4, v6 = _subnet_base(index)
        super().__init__(f"{PREFIX}{tag}{index}", f"{PREFIX}h{tag}{index}", f"{PREFIX}c{tag}{index}",
                         f"{v4}.1", f"{v6}::1", 24)
        self.link_local = link_local
        self.host_ll: str | None = None
        self.client_ll: str | None = None
        self.client_ip, self.client_ip6 = f"{v4}.2", f"{v6}::2"
        self.network = str(ipaddress.ip_network(f"{v4}.0/24"))
        self.network6 = str(ipaddress.ip_network(f"{v6}::/64"))

    def _before_up(self) -> None:
        if self.link_local:  # before the links come up: their fe80:: address is then usable at once
            run(["sysctl", "-qw", f"net.ipv6.conf.{self.host_link}.accept_dad=0"])
            self.run(["sysctl", "-qw", f"net.ipv6.conf.{self.ns_link}.accept_dad=0"])

    def _namespace_addresses(self) -> list[list[str]]:
        return [["ip", "addr", "add", f"{self.client_ip}/24", "dev", self.ns_link],
                ["ip", "-6", "addr", "add", f"{self.client_ip6}/64", "dev", self.ns_link, "nodad"]]

    def _after_up(self) -> None:
        if self.link_local:
            self.host_ll = _wait_for_link_local(["ip", "-6", "-o", "addr", "show", "dev", self.host_link])
            self.client_ll = _wait_for_link_local(
                ["ip", "netns", "exec", self.name, "ip", "-6", "-o", "addr", "show", "dev", self.ns_link])

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from inside the namespace (no handshake)."""
        return self.call(socket.create_connection, (host, port), timeout)
