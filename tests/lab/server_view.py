"""What the hypervisor itself sees of console clients: its kernel's established TCP
connections on the console ports (``ss`` in the hypervisor's network namespace) and QEMU's own
client list (``query-vnc``). Tests judge a cut here, never by what a client socket reads: a
client can hold a half-open socket that QEMU never accepted (its VNC backlog is 1)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.hypervisor import Domain, SessionHypervisor

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split(endpoint: str) -> tuple[IPAddress, int]:
    host, _sep, port = endpoint.rpartition(":")
    return _address(host), int(port)


def established_peers(ports: Iterable[int], netns: str | None = None) -> set[tuple[IPAddress, int]]:
    """(client address, client port) of every established connection to one of ``ports``,
    as the hypervisor's kernel sees it (IPv4-mapped peers as IPv4)."""
    peers: set[tuple[IPAddress, int]] = set()
    ports = sorted(set(ports))
    if not ports:
        return peers
    expression: list[str] = []
    for port in ports:
        expression += (["or"] if expression else []) + ["sport", "=", f":{port}"]
    cmd = ["ss", "-t", "-n", "-H", "state", "established", "(", *expression, ")"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            peers.add(_split(fields[3]))
    return peers


def vnc_clients(query_vnc_output: str) -> set[tuple[IPAddress, int]]:
    """(client address, client port) of every client in QEMU's ``query-vnc`` answer."""
    answer = json.loads(query_vnc_output)["return"]
    return {(_address(c["host"]), int(c["service"])) for c in answer.get("clients", [])}


def connected_clients(hv: SessionHypervisor, domains: Iterable[Domain]) -> set[tuple[IPAddress, int]]:
    """Every console client of ``domains`` (VNC), in the hypervisor kernel's view and in QEMU's."""
    domains = list(domains)
    clients = established_peers([d.vnc_port for d in domains])
    for domain in domains:
        clients |= vnc_clients(hv.query_vnc(domain.name))
    return clients


def nft_blocks(table: str, network: str, netns: str | None = None) -> bool:
    """Whether the block table holds ``network`` (an address or a CIDR), asked of nft itself:
    single addresses are in ``blocked_ipv4``/``blocked_ipv6``, a /N network's address in
    ``blocked_ipv4_pN``/``blocked_ipv6_pN``."""
    net = ipaddress.ip_network(network, strict=False)
    full = 32 if net.version == 4 else 128
    name = f"blocked_ipv{net.version}" + ("" if net.prefixlen == full else f"_p{net.prefixlen}")
    cmd = ["nft", "get", "element", "inet", table, name, "{", str(net.network_address), "}"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def nft_blocked_networks(table: str, netns: str | None = None) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every network the block sets of ``table`` hold, as values: an element of
    ``blocked_ipv4``/``blocked_ipv6`` as its /32 or /128, of ``blocked_ipvV_pN`` as its /N.
    Empty when the table does not exist."""
    cmd = ["nft", "-j", "list", "table", "inet", table]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    listed = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        return set()
    networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for item in json.loads(listed.stdout)["nftables"]:
        found = item.get("set", {})
        name = found.get("name", "")
        if not name.startswith("blocked_ipv"):
            continue
        prefix = int(name.rpartition("_p")[2]) if "_p" in name else (32 if name == "blocked_ipv4" else 128)
        for element in found.get("elem", []):
            value = element["elem"]["val"] if isinstance(element, dict) else element
            networks.add(ipaddress.ip_network((ipaddress.ip_address(value), prefix)))
    return networks
