# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The console firewall's table as ``nft -j list table inet T`` shows it (nftables 1.0.6), read
into a ``TableState``: chain declarations, rule comments, set declarations and elements as
integer ranges, counters, and the refused sources with their counts.

nft's JSON differs from its text here and there, and this is what is relied on: a set's
``flags`` list leaves out ``dynamic``, so a set with a timeout is recognised by its ``timeout``;
a per-element counter is the set's ``stmt: [{"counter": null}]``; an element is a string
(an address or a port), ``{"prefix": {"addr", "len"}}``, ``{"range": [low, high]}`` or any of
those wrapped in ``{"elem": {"val": ..., "expires": ..., "counter": {...}}}``.

Pure functions, standard library only, Python 3.8+ (the module_utils run on managed hosts).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_ruleset import (
    REFUSED_SOURCES_SET,
    FirewallError,
    Range,
    SetDeclaration,
    TableState,
)
from ansible_collections.virtguard.console.plugins.module_utils.ip_addresses import merge_ranges


def _value(text: Any, kind: str) -> int:
    """A port or an address of a set's element as an integer."""
    if kind == "inet_service":
        return int(text)
    return int(ipaddress.ip_address(str(text)))


def element_range(item: Any, kind: str) -> Range:
    """One element of a set in nft's JSON as an integer range."""
    if isinstance(item, dict) and "elem" in item:
        item = item["elem"]["val"]
    if isinstance(item, dict) and "prefix" in item:
        network = ipaddress.ip_network(f"{item['prefix']['addr']}/{item['prefix']['len']}", strict=False)
        return int(network.network_address), int(network.broadcast_address)
    if isinstance(item, dict) and "range" in item:
        low, high = item["range"]
        return _value(low, kind), _value(high, kind)
    value = _value(item, kind)
    return value, value


def _refused_source(item: Any) -> dict[str, Any]:
    elem = item["elem"] if isinstance(item, dict) and "elem" in item else {"val": item}
    counter = elem.get("counter") or {}
    return {"address": str(ipaddress.ip_address(str(elem["val"]))), "packets": int(counter.get("packets", 0)),
            "bytes": int(counter.get("bytes", 0)), "expires_in": elem.get("expires")}


def _set_declaration(raw: dict[str, Any]) -> SetDeclaration:
    flags = raw.get("flags", [])
    flags = [flags] if isinstance(flags, str) else list(flags)
    counter = any(isinstance(stmt, dict) and "counter" in stmt for stmt in raw.get("stmt", []))
    return SetDeclaration(str(raw["type"]), "interval" in flags, raw.get("size"), raw.get("timeout"), counter)


def parse_table(output: str, table: str) -> TableState:
    """``nft -j list table inet TABLE``'s output as a TableState."""
    try:
        items = json.loads(output)["nftables"]
        chains: dict[str, dict[str, Any]] = {}
        comments: dict[str, list[str | None]] = {}
        sets: dict[str, SetDeclaration] = {}
        elements: dict[str, list[Range]] = {}
        counters: dict[str, dict[str, int]] = {}
        refused: list[dict[str, Any]] = []
        for item in items:
            kind, raw = next(iter(item.items()))
            if not isinstance(raw, dict) or raw.get("table", table) != table:
                continue
            if kind == "chain":
                chains[raw["name"]] = {key: raw[key] for key in ("type", "hook", "prio", "policy") if key in raw}
            elif kind == "rule":
                comments.setdefault(raw["chain"], []).append(raw.get("comment"))
            elif kind == "counter":
                counters[raw["name"]] = {"packets": int(raw.get("packets", 0)), "bytes": int(raw.get("bytes", 0))}
            elif kind == "set":
                declaration = _set_declaration(raw)
                sets[raw["name"]] = declaration
                if raw["name"] in REFUSED_SOURCES_SET.values():
                    refused += [_refused_source(elem) for elem in raw.get("elem", [])]
                elif declaration.interval or declaration.type == "inet_service":
                    elements[raw["name"]] = merge_ranges(element_range(elem, declaration.type)
                                                         for elem in raw.get("elem", []))
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        raise FirewallError(f"cannot read nft's JSON listing of table inet {table}: {exc!r}") from None
    for chain in chains:
        comments.setdefault(chain, [])
    refused.sort(key=lambda source: (-source["packets"], source["address"]))
    return TableState(chains, comments, sets, elements, counters, refused)
