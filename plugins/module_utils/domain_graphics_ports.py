# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TCP ports of the consoles of a libvirt host's domains, from their XML: the ports a
domain was given (``autoport='no'``, in its persistent definition) and the ports a running
domain has now (its live XML), for VNC (``port``, ``websocket``) and SPICE (``port``,
``tlsPort``). Autoport values not allocated yet (``-1``) and sockets (no port) are left out.

Read with one ``virsh`` process per 200 domains: ``list --all --uuid``, then ``dumpxml`` and
``dumpxml --inactive`` of each domain by UUID in one command string, the documents separated by
``echo`` of a random marker (so nothing in a domain's XML can pass for a separator). A domain
that disappears in between is skipped (virsh says ``failed to get domain``).

Domain names are data (reported, never run). Standard library only, Python 3.8+.
"""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple
from xml.etree import ElementTree

from ansible_collections.virtguard.console.plugins.module_utils.host_commands import Run

GRAPHICS_PORT_ATTRIBUTES = {"vnc": ("port", "websocket"), "spice": ("port", "tlsPort")}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_GONE = "failed to get domain"
# Domains per virsh process: keeps one command string far below the kernel's 128 KiB for one argument.
_CHUNK = 200


class DomainReadError(Exception):
    """virsh could not list the domains or read their XML."""


class GraphicsPort(NamedTuple):
    domain: str
    graphics: str  # vnc or spice
    attribute: str  # port, websocket or tlsPort
    port: int


def graphics_ports(xml_text: str) -> list[GraphicsPort]:
    """The console ports in one domain XML document."""
    try:
        root = ElementTree.fromstring(xml_text)
    except ElementTree.ParseError as exc:
        raise DomainReadError(f"cannot read a domain's XML: {exc}") from None
    name = root.findtext("name") or ""
    found = []
    for graphics in root.findall("./devices/graphics"):
        kind = graphics.get("type", "")
        for attribute in GRAPHICS_PORT_ATTRIBUTES.get(kind, ()):
            value = graphics.get(attribute, "")
            if value.isascii() and value.isdigit() and 0 < int(value) <= 65535:
                found.append(GraphicsPort(name, kind, attribute, int(value)))
    return found


def split_documents(output: str, marker: str) -> list[str]:
    """The XML documents between the markers, empty ones (a domain that went away) left out."""
    return [part.strip() for part in output.split(marker) if part.strip()]


def read_graphics_ports(run: Run, uri: str) -> list[GraphicsPort]:
    """Every console port of every domain defined or running on the daemon at ``uri``
    (duplicates removed, sorted by port)."""
    rc, out, err = run(["virsh", "-q", "-c", uri, "list", "--all", "--uuid"])
    if rc != 0:
        raise DomainReadError(f"virsh -c {uri} list --all --uuid failed (rc {rc}): {err.strip()}")
    uuids = [word for word in out.split() if _UUID.match(word)]
    marker = f"vgfw-{secrets.token_hex(8)}"
    found: set[GraphicsPort] = set()
    for start in range(0, len(uuids), _CHUNK):
        commands = "; ".join(f"dumpxml {uuid}; echo {marker}; dumpxml --inactive {uuid}; echo {marker}"
                             for uuid in uuids[start:start + _CHUNK])
        rc, out, err = run(["virsh", "-q", "-c", uri, commands])
        errors = [line for line in err.splitlines() if line.strip() and _GONE not in line]
        if rc != 0 or errors:
            raise DomainReadError(f"virsh -c {uri} dumpxml failed (rc {rc}): {' '.join(errors).strip()}")
        for document in split_documents(out, marker):
            found.update(graphics_ports(document))
    return sorted(found, key=lambda p: (p.port, p.domain, p.graphics, p.attribute))
