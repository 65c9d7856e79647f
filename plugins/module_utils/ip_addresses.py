# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Client addresses, blocked networks and console ports as values, never as text.

Every address that remediation compares (from libvirt's events, ``ss``, ``nft`` or a user) goes
through :func:`normalize_address` or :func:`parse_network`, so the same address written two ways
(``::10.0.0.1`` as nft prints it, ``::a00:1`` as Python does; ``::ffff:192.0.2.7`` from a
dual-stack socket) is one value.

Also the limits nftables really has here (Debian 12, nftables 1.0.6), so that the filter can
refuse a configuration at start instead of failing at the first block.

Pure functions, standard library only, Python 3.8+ (the module_utils run on managed hosts).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# The largest per-element timeout (seconds) a block may have. Measured with nftables 1.0.6 on
# kernel 6.18: `add element ... { 10.0.0.1 timeout 99999999s }` is accepted and listed back
# exactly (1157d9h46m39s); 100000000s and more fail with "Error: value too large". Rounded
# down to 1000 days.
MAX_BLOCK_SECONDS: int = 86_400_000

# Elements per block set (`size` of blocked_ipv4 / blocked_ipv6) unless configured otherwise.
DEFAULT_SET_SIZE: int = 65536
# The largest `size` nftables 1.0.6 keeps as given: 2**31 - 1 reads back unchanged; larger
# values are accepted without an error but stored wrong (2**31 and 2**32 read back as no size
# at all, i.e. unbounded; 3000000000 as 852516352). `size 0` also means unbounded.
MAX_SET_SIZE: int = 2**31 - 1

# The widest networks a block may take: console_block refuses wider ones (blocking 0.0.0.0/0 or
# ::/8 from the consoles locks everyone out), so block_network's ipv6_prefix starts here too.
MIN_IPV4_PREFIX: int = 8
MIN_IPV6_PREFIX: int = 16

# IPv6 ranges whose addresses embed an IPv4 address (or are special): a /64 there spans many
# unrelated hosts (``::/64`` holds ::1 and every IPv4-compatible address, 64:ff9b::/96 every
# IPv4 host behind NAT64), so a client there is blocked as its own /128.
_IPV6_NO_PREFIX_BLOCK = tuple(ipaddress.ip_network(text) for text in (
    "::/96",            # unspecified, loopback, IPv4-compatible (deprecated)
    "::ffff:0:0/96",    # IPv4-mapped
    "64:ff9b::/96",     # NAT64 well-known prefix (RFC 6052)
    "64:ff9b:1::/48",   # NAT64 local-use prefix (RFC 8215)
    "2001::/32",        # Teredo: the /64 is one relay's clients
    "fe80::/10",        # link-local: fe80::/64 is every link-local client on every link of the host
))
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class AddressError(ValueError):
    """An address, network or port that is not valid; the message names the value."""


def normalize_address(text: object) -> IPAddress | None:
    """``text`` (an address value or a string) as an address value, or None when it is not an IP
    address.

    ``[::1]`` and ``fe80::1%eth0`` are read without brackets and scope; an IPv4-mapped address
    (``::ffff:192.0.2.7``) becomes its IPv4 address, as it is on the wire for a dual-stack
    socket. An IPv4-compatible address (``::10.0.0.1``) stays IPv6: it is a distinct IPv6
    address on the wire."""
    if isinstance(text, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address: IPAddress = text
        if address.version == 6 and getattr(address, "scope_id", None):
            address = ipaddress.IPv6Address(str(address).split("%", 1)[0])
    elif isinstance(text, str):
        candidate = text.strip()
        if candidate.startswith("[") and candidate.endswith("]"):
            candidate = candidate[1:-1]
        # The scope is dropped before parsing: Python 3.9+ keeps it in the value, and a scoped
        # address compares unequal to the same address without it.
        candidate = candidate.split("%", 1)[0]
        if not candidate:
            return None
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            return None
    else:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: object) -> IPNetwork:
    """An address or a CIDR network as a network value (host bits allowed: ``10.1.2.3/8`` is
    10.0.0.0/8); a bare address is its /32 or /128. IPv4-mapped networks (subnets of
    ``::ffff:0:0/96``) become IPv4 networks. Raises AddressError."""
    if isinstance(text, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        network: IPNetwork = text
    elif isinstance(text, (ipaddress.IPv4Address, ipaddress.IPv6Address)) or (
            isinstance(text, str) and "/" not in text):
        address = normalize_address(text)
        if address is None:
            raise AddressError(f"{text!r} is neither an IP address nor a network")
        return ipaddress.ip_network(address)
    elif isinstance(text, str):
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError as exc:
            raise AddressError(f"{text!r} is not a network ({exc})") from None
    else:
        raise AddressError(f"{text!r} is neither an IP address nor a network "
                           f"(a {type(text).__name__}, not a string)")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


def block_network(address: str | IPAddress, ipv6_prefix: object = 64,
                  trusted: Sequence[str | IPNetwork] = ()) -> IPNetwork:
    """The network that remediation blocks for a client ``address``.

    IPv4: the address's /32. IPv6: its /``ipv6_prefix`` (MIN_IPV6_PREFIX to 128; 128 = the
    address alone), but only the
    address's /128 when that prefix overlaps a trusted network (a trusted address is never
    blocked as a side effect) or one of the ranges that embed IPv4 addresses (``::/96``,
    ``::ffff:0:0/96``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, Teredo ``2001::/32``) or
    link-local ``fe80::/10`` (one /64 there is every link-local client of every link),
    where a prefix would span many unrelated hosts."""
    client = normalize_address(address)
    if client is None:
        raise AddressError(f"{address!r} is not an IP address")
    if (isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int)
            or not MIN_IPV6_PREFIX <= ipv6_prefix <= 128):
        raise AddressError(f"ipv6_prefix must be an integer from {MIN_IPV6_PREFIX} to 128, got {ipv6_prefix!r}")
    own = ipaddress.ip_network(client)
    if client.version == 4 or ipv6_prefix == 128:
        return own
    prefix = ipaddress.ip_network(f"{client}/{ipv6_prefix}", strict=False)
    if per_address_only(prefix):
        return own
    for item in trusted:
        network = parse_network(item)
        if network.version == 6 and prefix.overlaps(network):
            return own
    return prefix


def per_address_only(network: IPNetwork) -> bool:
    """Whether ``network`` overlaps an IPv6 range whose clients are blocked by their address
    alone (those that embed IPv4 addresses: ``::/96``, ``::ffff:0:0/96``, NAT64, Teredo; and
    link-local ``fe80::/10``, whose one /64 holds every link's clients), so that no block there
    may be wider than one address."""
    return isinstance(network, ipaddress.IPv6Network) and any(
        network.overlaps(special) for special in _IPV6_NO_PREFIX_BLOCK)


def network_within(inner: IPNetwork, outer: IPNetwork) -> bool:
    """Whether ``inner`` lies in ``outer`` (never across IP versions, where ``subnet_of`` raises)."""
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def parse_port_ranges(ports: Iterable[int | str] | int | str) -> list[tuple[int, int]]:
    """Ports and ranges (``5900``, ``"5900"``, ``"5900-5999"``) as ``(first, last)`` pairs from 1
    to 65535, sorted, with overlapping and adjacent ranges merged. A single int or string is
    one item. Raises AddressError naming the item."""
    items = [ports] if isinstance(ports, (int, str)) else list(ports)
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise AddressError(f"ports: {item!r} is neither a port nor a range like 5900-5999")
        text = str(item).strip()
        first, sep, last = text.partition("-")
        first, last = first.strip(), last.strip()
        if not (first.isascii() and first.isdigit()) or (sep and not (last.isascii() and last.isdigit())):
            raise AddressError(f"ports: {item!r} is neither a port nor a range like 5900-5999")
        low = int(first)
        high = int(last) if sep else low
        if not 1 <= low <= high <= 65535:
            raise AddressError(f"ports: {item!r} is not within 1-65535 (first port <= last port)")
        ranges.append((low, high))
    return merge_ranges(ranges)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Integer ranges ``(first, last)`` sorted, overlapping and adjacent ones merged (ports,
    and addresses as integers)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return merged


def format_port_ranges(ranges: Iterable[tuple[int, int]]) -> list[str]:
    """``[(5900, 5999), (6012, 6012)]`` -> ``["5900-5999", "6012"]``."""
    return [str(low) if low == high else f"{low}-{high}" for low, high in ranges]


def port_in_ranges(port: int, ranges: Iterable[tuple[int, int]]) -> bool:
    """Whether ``port`` lies in one of ``ranges``."""
    return any(low <= port <= high for low, high in ranges)
