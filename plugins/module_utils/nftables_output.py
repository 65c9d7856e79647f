# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading what nft prints (nftables 1.0.6, Debian 12) for the block table
(``nftables_block.BlockTable``): a set's JSON listing, the chains of a table, and the text
``get element`` prints even with ``-j``. Pure functions; nothing here runs nft.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any, Iterable

from ansible_collections.virtguard.console.plugins.module_utils.nftables_plan import Element, SetState


class NftablesError(Exception):
    """nft failed or the ruleset is not what it should be."""


def _address_of(text: str) -> tuple[int, int]:
    """``(version, address as int)`` of an address as nft prints it (``::10.0.0.1`` and
    ``::a00:1`` are the same value). inet_pton is strict and ten times faster than ipaddress,
    which counts with 65536 elements per set."""
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        try:
            return version, int.from_bytes(socket.inet_pton(family, text), "big")
        except (OSError, ValueError):
            continue
    raise ValueError(f"{text!r} is not an IP address")


def parse_address_elements(raw: Iterable[Any]) -> list[Element]:
    """The ``elem`` list of an address set in nft's JSON: ``"10.0.0.2"`` (no timeout) or
    ``{"elem": {"val": "10.0.0.1", "timeout": 600, "expires": 599}}``."""
    elements = []
    for item in raw:
        timeout = expires = None
        if isinstance(item, dict) and "elem" in item:
            timeout = item["elem"].get("timeout")
            expires = item["elem"].get("expires")
            item = item["elem"]["val"]
        if not isinstance(item, str):
            raise ValueError(f"unexpected element {item!r} in an address set")
        version, address = _address_of(item)
        elements.append(Element(version, address, timeout, expires))
    return elements


def parse_port_elements(raw: Iterable[Any]) -> list[tuple[int, int]]:
    """The ``elem`` list of the port set in nft's JSON: ``5900`` or ``{"range": [5900, 5999]}``."""
    ports = []
    for item in raw:
        if isinstance(item, dict) and "elem" in item:
            item = item["elem"]["val"]
        if isinstance(item, dict) and "range" in item:
            ports.append((int(item["range"][0]), int(item["range"][1])))
        else:
            ports.append((int(item), int(item)))
    return sorted(ports)


def parse_set_json(output: str) -> SetState:
    """The one set of ``nft -j list set inet T NAME``."""
    try:
        raw = [item["set"] for item in json.loads(output)["nftables"] if "set" in item][0]
        name, kind = raw["name"], raw["type"]
        elements: list[Any] = (parse_port_elements(raw.get("elem", [])) if kind == "inet_service"
                               else parse_address_elements(raw.get("elem", [])))
        flags = raw.get("flags", [])
        flags = tuple(sorted([flags] if isinstance(flags, str) else flags))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise NftablesError(f"cannot read nft's JSON listing of a set: {exc!r}") from None
    return SetState(name, kind, flags, raw.get("size"), tuple(elements))


def parse_chain_names(output: str, table: str) -> list[dict[str, Any]]:
    """The chains of ``table`` in ``nft -j list chains inet``."""
    try:
        items = json.loads(output)["nftables"]
    except (ValueError, KeyError) as exc:
        raise NftablesError(f"cannot read nft's JSON listing of chains: {exc!r}") from None
    return [item["chain"] for item in items if "chain" in item and item["chain"].get("table") == table]


def parse_get_output(output: str) -> dict[str, set[tuple[int, int]]]:
    """The elements nft 1.0.6 prints (as text, even with ``-j``) for ``get element`` commands,
    by set: ``set blocked_ipv4 { ... elements = { 10.0.0.2, 10.0.0.1 timeout 9m50s expires
    9m49s952ms } }`` -> ``{"blocked_ipv4": {(4, 167772162), (4, 167772161)}}``."""
    found: dict[str, set[tuple[int, int]]] = {}
    for name, block in re.findall(r"set (\S+) \{[^{}]*?elements = \{([^}]*)\}", output):
        values = found.setdefault(name, set())
        for item in block.split(","):
            words = item.split()
            if words:
                try:
                    values.add(_address_of(words[0]))
                except ValueError:
                    raise NftablesError(f"cannot read element {words[0]!r} in nft's output") from None
    return found
