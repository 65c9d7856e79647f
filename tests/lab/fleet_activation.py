"""An activation of the shipped ``unauthorized_console`` rulebook over fleet hosts (lab.fleet),
for the fleet's remediation tests: the hosts started, a domain on each, the rulebook watching
the given hosts by ``qemu+tls``, the inventory reaching them over SSH, all removed at the end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lab.fleet import FleetHost, start_hosts, stop_hosts
from lab.hypervisor import Domain
from lab.rulebook_runner import RulebookRun


class FleetLab:
    """The hosts by name, the domain on each, the activation's audit file and the activation."""

    def __init__(self, hosts: Mapping[str, FleetHost], work: Path) -> None:
        self.hosts = dict(hosts)
        self.domains: dict[str, Domain] = {}
        self.audit = work / "audit.jsonl"
        self.activation: RulebookRun | None = None


@contextlib.contextmanager
def fleet_lab(names: Sequence[str], watched: Sequence[str], work: Path,
              variables: Callable[[FleetLab], dict[str, Any]],
              inventory: Callable[[dict[str, FleetHost]], dict[str, Any]]) -> Iterator[FleetLab]:
    """Hosts ``names`` with a domain each, and ``unauthorized_console`` watching ``watched``
    (the URIs and the audit log set here, the rest from ``variables(lab)``), its inventory
    ``inventory(hosts)``; yielded once the activation watches every host of ``watched``."""
    hosts = start_hosts(names)
    lab = FleetLab(dict(zip(names, hosts, strict=True)), work)
    try:
        for name, host in lab.hosts.items():
            lab.domains[name] = host.create_domain(f"{name}-d0")
        lab.activation = RulebookRun("unauthorized_console", {
            "virtguard_uri": [lab.hosts[name].tls_uri for name in watched],
            "virtguard_audit_log": str(lab.audit),
            **variables(lab),
        }, work, inventory=inventory(lab.hosts)).start()
        for name in watched:
            lab.activation.wait_for_log(f"watching graphics events on {name}", timeout=60)
        yield lab
    finally:
        if lab.activation is not None:
            lab.activation.stop()
        stop_hosts(hosts)
