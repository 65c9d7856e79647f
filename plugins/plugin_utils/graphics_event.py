# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The libvirt-to-payload mapping of graphics events: the one place that says what
``event.graphics`` looks like. Pure functions over plain data, no libvirt import, so the
event source, the event filter, the benchmark and the tests all share it.

Everything that comes from the console client (remote address, certificate DN, SASL user
name) is copied verbatim as plain ``str``: it is data, never interpreted here.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
from typing import AbstractSet, Any, Dict, List, Mapping, Sequence, Tuple

# An address as the payload has it: family, node, service (all str).
Address = Dict[str, str]
# libvirt's subject: (type, name) pairs.
Subject = Sequence[Tuple[str, str]]
# What query-vnc / query-spice give per client: (local, remote, auth_scheme, subject, protocol,
# remote addresses of all its channels). A VNC client is one channel; the local and remote
# addresses of a SPICE client are its main channel's.
Client = Tuple[Address, Address, str, List[Tuple[str, str]], str, List[Address]]

# query-spice's channel-type of the main channel (SPICE_CHANNEL_MAIN), the one a client links first.
SPICE_MAIN_CHANNEL = 1

# virDomainEventGraphicsPhase and virDomainEventGraphicsAddressType, as numbered by libvirt.
PHASES = ("connect", "initialize", "disconnect")
FAMILIES = ("ipv4", "ipv6", "unix")

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def phase_name(phase: int) -> str:
    """``0`` -> ``connect``; an unknown number is kept visible rather than dropped."""
    if 0 <= phase < len(PHASES):
        return PHASES[phase]
    return f"unknown-{phase}"


def family_name(family: int | str) -> str:
    if isinstance(family, str):
        return family
    if 0 <= family < len(FAMILIES):
        return FAMILIES[family]
    return f"unknown-{family}"


def address(raw: Mapping[str, Any]) -> Address:
    """libvirt's ``{family: int, node, service}`` (or QEMU's names) as the payload's address."""
    return {
        "family": family_name(raw.get("family", 0)),
        "node": str(raw.get("node", "")),
        "service": str(raw.get("service", "")),
    }


def qemu_address(raw: Mapping[str, Any]) -> Address:
    """An address as QEMU's monitor names it (``host``, ``service``, ``family``)."""
    return address({"family": raw.get("family", "ipv4"), "node": raw.get("host", ""),
                    "service": raw.get("service", "")})


def identity_key(identity_type: str) -> str:
    """``saslUsername`` -> ``sasl_username``, ``x509dname`` stays ``x509dname``."""
    key = _IDENTITY_KEYS.get(identity_type)
    if key is None:
        key = _CAMEL_BOUNDARY.sub("_", identity_type).lower()
        if len(_IDENTITY_KEYS) < 64:  # QEMU names a handful of types; never grow without bound
            _IDENTITY_KEYS[identity_type] = key
    return key


_IDENTITY_KEYS: dict[str, str] = {}


def subject_list(subject: Subject) -> list[dict[str, str]]:
    """libvirt's subject (a list of ``(type, name)`` pairs) as a list of ``{type, name}``."""
    return [{"type": str(kind), "name": str(name)} for kind, name in subject]


def identity_from_subject(subject: Subject) -> dict[str, str]:
    """The subject flattened for rule conditions; the first identity of a type wins."""
    identity: dict[str, str] = {}
    for kind, name in subject:
        identity.setdefault(identity_key(str(kind)), str(name))
    return identity


def iso_timestamp_utc(wall: float) -> str:
    """``datetime.fromtimestamp(wall, timezone.utc).isoformat()``, to the character, at a third
    of its cost: the date and time of day are formatted once per second."""
    global _LAST_SECOND
    fraction, whole = math.modf(wall)
    micro = round(fraction * 1e6)  # as datetime rounds: half to even
    if micro >= 1000000:
        whole += 1
        micro -= 1000000
    second, text = _LAST_SECOND
    if whole != second:
        text = datetime.datetime.fromtimestamp(whole, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _LAST_SECOND = (whole, text)  # one assignment: safe to share between threads
    if micro:
        return "%s.%06d+00:00" % (text, micro)  # noqa: UP031 per event: measured cheaper than f"{micro:06d}"
    return text + "+00:00"


_LAST_SECOND: tuple[float | None, str] = (None, "")


def session_id_for(hypervisor_uri: str, domain_uuid: str, remote: Address) -> str:
    """A stable id for one client session: the same for all its events, and the same when
    the source restarts, because it depends only on where the session is."""
    key = "\x1f".join(
        (hypervisor_uri, domain_uuid, remote["family"], remote["node"], remote["service"])
    )
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def live_protocol(auth_scheme: str, local: Address, spice_ports: AbstractSet[str] = frozenset()) -> str:
    """``vnc`` or ``spice`` for a live event of a channel the source has not seen connect.

    QEMU's VNC events always name the VNC server's auth scheme (``none``, ``vnc``,
    ``vencrypt+x509+sasl``, ...); its SPICE ``connect`` and ``disconnect`` events carry none
    (``''``), and its SPICE ``initialize`` names SPICE's (``none``, ``spice``, ``sasl``). Only an
    ``initialize`` of ``none`` or ``sasl`` whose ``connect`` was missed is ambiguous: then the
    domain's SPICE ports, as the last snapshot found them (``spice_ports``), decide."""
    if auth_scheme in ("", "spice") or local["service"] in spice_ports:
        return "spice"
    return "vnc"


def graphics_payload(phase: str, timestamp: str, hypervisor: Mapping[str, Any], domain: Mapping[str, Any],
                     local: Address, remote: Address, auth_scheme: str, subject: Subject,
                     session: Mapping[str, Any], snapshot: bool = False, protocol: str = "vnc",
                     ) -> dict[str, dict[str, Any]]:
    """The event put on the rulebook queue: ``{"graphics": {...}}``.

    ``phase`` is the phase name, ``local`` and ``remote`` payload addresses, ``subject`` libvirt's
    list of ``(type, name)`` pairs, ``session`` the mapping SessionTracker made (session_tracking)
    and ``protocol`` ``vnc`` or ``spice``.
    """
    return {
        "graphics": {
            "phase": phase,
            "protocol": protocol,
            "snapshot": snapshot,
            "timestamp": timestamp,
            "hypervisor": hypervisor,
            "domain": domain,
            "local": local,
            "remote": remote,
            "auth_scheme": str(auth_scheme),
            "subject": subject_list(subject),
            "identity": identity_from_subject(subject),
            "session": session,
        }
    }


def _vnc_subject(client: Mapping[str, Any]) -> list[tuple[str, str]]:
    subject: list[tuple[str, str]] = []
    if client.get("x509_dname"):
        subject.append(("x509dname", client["x509_dname"]))
    if client.get("sasl_username"):
        subject.append(("saslUsername", client["sasl_username"]))
    return subject


def clients_from_query_vnc(result: Mapping[str, Any] | None) -> list[Client]:
    """QEMU's ``query-vnc`` answer as one ``Client`` per VNC client.

    The local address is the VNC listener, as libvirt reports it in live events."""
    if not result or not result.get("enabled"):
        return []
    local = qemu_address(result)
    auth_scheme = result.get("auth", "none")
    clients: list[Client] = []
    for client in result.get("clients", []):
        remote = qemu_address(client)
        clients.append((local, remote, auth_scheme, _vnc_subject(client), "vnc", [remote]))
    return clients


def spice_ports(result: Mapping[str, Any] | None) -> set[str]:
    """The ports of a ``query-spice`` answer's server (plain and TLS), as payload services."""
    if not result or not result.get("enabled"):
        return set()
    return {str(result[key]) for key in ("port", "tls-port") if result.get(key) is not None}


def clients_from_query_spice(result: Mapping[str, Any] | None) -> list[Client]:
    """QEMU's ``query-spice`` answer as one ``Client`` per SPICE client: its channels grouped by
    ``connection-id``, the main channel (``channel-type`` 1) giving the client's addresses (the
    first listed channel when none is the main one)."""
    if not result or not result.get("enabled"):
        return []
    auth_scheme = result.get("auth", "none")
    by_connection: dict[Any, list[Mapping[str, Any]]] = {}
    for channel in result.get("channels", []):
        by_connection.setdefault(channel.get("connection-id"), []).append(channel)
    clients: list[Client] = []
    for channels in by_connection.values():
        main = next((c for c in channels if c.get("channel-type") == SPICE_MAIN_CHANNEL), channels[0])
        ordered = [main] + [channel for channel in channels if channel is not main]
        remotes = [_spice_channel_remote(c) for c in ordered]
        clients.append((_spice_channel_local(result, main), remotes[0], auth_scheme, [], "spice", remotes))
    return clients


def spice_channel_locals(result: Mapping[str, Any] | None) -> dict[tuple[str, str], Address]:
    """The server address of each channel of a ``query-spice`` answer (the plain or the TLS
    port), by the channel's client address and port (``node``, ``service``)."""
    if not result or not result.get("enabled"):
        return {}
    locals_: dict[tuple[str, str], Address] = {}
    for channel in result.get("channels", []):
        remote = _spice_channel_remote(channel)
        locals_[(remote["node"], remote["service"])] = _spice_channel_local(result, channel)
    return locals_


def _spice_channel_remote(channel: Mapping[str, Any]) -> Address:
    return qemu_address({"family": channel.get("family", "ipv4"), "host": channel.get("host", ""),
                         "service": channel.get("port", "")})


def _spice_channel_local(result: Mapping[str, Any], channel: Mapping[str, Any]) -> Address:
    port = result.get("tls-port") if channel.get("tls") else result.get("port")
    return qemu_address({"family": channel.get("family", "ipv4"), "host": result.get("host", ""),
                         "service": "" if port is None else port})
