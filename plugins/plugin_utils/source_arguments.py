# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The event source's arguments: declared once (``SOURCE_OPTIONS``; the source's DOCUMENTATION
describes each, and a unit test holds the two together), checked once at start with the rules
every plugin of the collection shares (``plugin_arguments.check_arguments``), plus what only a
libvirt URI list needs."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ansible_collections.virtguard.console.plugins.plugin_utils.plugin_arguments import (
    ArgumentError,
    Option,
    check_arguments,
    where,
)

__all__ = ["PLUGIN", "SOURCE_OPTIONS", "ArgumentError", "SourceArguments"]

PLUGIN = "virtguard.console.libvirt_graphics"

SOURCE_OPTIONS = (
    Option("uri", "list", default=["qemu:///system"], elements="str"),
    Option("domains", "list", elements="str"),
    Option("keepalive_interval", "int", default=5, minimum=0),
    Option("keepalive_count", "int", default=3, minimum=0),
    Option("reconnect_delay", "float", default=1.0),
    Option("reconnect_max_delay", "float", default=60.0),
    Option("connect_timeout", "float", default=5.0),
    Option("snapshot", "bool", default=True),
    Option("max_buffered_events", "int", default=100000, minimum=1),
    Option("heartbeat_interval", "float", default=10.0, minimum=0),
    Option("busy_heartbeat_delay", "float", default=0.5, minimum=0),
    Option("delivery_check_interval", "float", default=20.0, minimum=0),
    Option("delivery_check_timeout", "float", default=10.0),
    Option("max_event_rate", "int", default=4000, minimum=0),
    Option("shed_seconds", "float", default=10.0),
    Option("max_reply_lag", "float", default=0.0, minimum=0),
)

# The shortest heartbeat interval: faster beats would only load the rule engine.
MIN_HEARTBEAT_INTERVAL = 0.1


class SourceArguments:
    """The source's arguments, checked once at start; an ArgumentError names the argument."""

    def __init__(self, args: Mapping[str, Any]):
        given = dict(args)
        for name in ("uri", "domains"):  # one string stands for a list of one
            if isinstance(given.get(name), str):
                given[name] = [given[name]]
        checked = check_arguments(PLUGIN, SOURCE_OPTIONS, given)

        def fail(name: str, problem: str) -> ArgumentError:
            return ArgumentError(f"{where(PLUGIN, name, None)} {problem}")

        def given_value(name: str) -> str:
            return f"{type(given[name]).__name__} {given[name]!r}"

        self.uris: list[str] = checked["uri"]
        if not self.uris:
            raise fail("uri", "must name at least one libvirt URI, got an empty list")
        for uri in self.uris:
            if not urlsplit(uri).scheme or "://" not in uri or any(ch.isspace() for ch in uri):
                raise fail("uri", f"{uri!r} is not a libvirt URI (like qemu:///system)")
        duplicates = sorted({uri for uri in self.uris if self.uris.count(uri) > 1})
        if duplicates:
            raise fail("uri", f"{', '.join(duplicates)} given more than once")

        self.domains: list[str] | None = checked["domains"]
        if self.domains is not None and (not self.domains or not all(self.domains)):
            raise fail("domains", f"must be a non-empty list of name patterns, got {given_value('domains')}")

        self.keepalive_interval: int = checked["keepalive_interval"]
        self.keepalive_count: int = checked["keepalive_count"]
        self.reconnect_delay: float = checked["reconnect_delay"]
        self.reconnect_max_delay: float = checked["reconnect_max_delay"]
        self.connect_timeout: float = checked["connect_timeout"]
        for name in ("reconnect_delay", "reconnect_max_delay", "connect_timeout"):
            if checked[name] <= 0:
                raise fail(name, f"must be greater than 0, got {given_value(name)}")
        if self.reconnect_max_delay < self.reconnect_delay:
            raise fail("reconnect_max_delay", f"({self.reconnect_max_delay:g}) must not be less than "
                                              f"reconnect_delay ({self.reconnect_delay:g})")
        self.snapshot: bool = checked["snapshot"]
        self.max_buffered_events: int = checked["max_buffered_events"]
        self.heartbeat_interval: float = checked["heartbeat_interval"]
        self.busy_heartbeat_delay: float = checked["busy_heartbeat_delay"]
        self.delivery_check_interval: float = checked["delivery_check_interval"]
        self.delivery_check_timeout: float = checked["delivery_check_timeout"]
        if checked["delivery_check_timeout"] <= 0:
            raise fail("delivery_check_timeout", f"must be greater than 0, got {given_value('delivery_check_timeout')}")
        self.max_event_rate: int = checked["max_event_rate"]
        self.shed_seconds: float = checked["shed_seconds"]
        self.max_reply_lag: float = checked["max_reply_lag"]
        if checked["shed_seconds"] <= 0:
            raise fail("shed_seconds", f"must be greater than 0, got {given_value('shed_seconds')}")
        for name in ("heartbeat_interval", "busy_heartbeat_delay"):
            if 0 < checked[name] < MIN_HEARTBEAT_INTERVAL:
                raise fail(name, f"must be 0 (off) or at least {MIN_HEARTBEAT_INTERVAL:g}, got {given_value(name)}")

    def watches_domain(self, name: str) -> bool:
        """Whether ``domains`` lets the domain called ``name`` through (all, without patterns)."""
        return not self.domains or any(fnmatch.fnmatchcase(name, p) for p in self.domains)


# libvirt's TCP ports for the transports where libvirt itself connects to the host (TLS is the
# transport of a remote URI that names none). SSH transports go through ssh, whose configuration
# (another HostName or Port, a jump host) the source cannot see: they are not probed.
DIRECT_TRANSPORT_PORTS = {"": 16514, "tls": 16514, "tcp": 16509}


def direct_endpoint(uri: str) -> tuple[str, int] | None:
    """The host and port libvirt connects to for ``uri``, when it connects directly (qemu+tls,
    qemu+tcp, or a remote qemu:// URI); None for local, unix, SSH and ext URIs."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number: libvirt says what is wrong
        return None
    if not host or transport not in DIRECT_TRANSPORT_PORTS:
        return None
    return host, port or DIRECT_TRANSPORT_PORTS[transport]
