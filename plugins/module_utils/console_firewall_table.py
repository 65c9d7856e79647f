# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The console firewall's table on this host, through ``run(argv, data=None) -> (rc, out,
err)``: read it, make it what a FirewallSpec says in one ``nft -f -`` transaction (atomic: no
packet ever meets half a table), check that it then is, or remove it.

The table is small (two address sets of networks, one port set, the refused sources: at most
2 x 4096 elements), so it is listed whole with ``nft -j list table``.
"""

from __future__ import annotations

from typing import Any

from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_listing import parse_table
from ansible_collections.virtguard.console.plugins.module_utils.console_firewall_ruleset import (
    ALLOWED_COUNTER,
    RATE_LIMITED_COUNTER,
    REFUSED_COUNTER,
    FirewallError,
    FirewallSpec,
    TableState,
    check_table_name,
    differences,
    script,
)
from ansible_collections.virtguard.console.plugins.module_utils.host_commands import Run

_MISSING = "No such file or directory"


class FirewallTable:
    def __init__(self, run: Run, table: str) -> None:
        self.run = run
        self.table = check_table_name(table)

    def read(self) -> TableState | None:
        """The table, or None when this host has none."""
        rc, out, err = self.run(["nft", "-j", "list", "table", "inet", self.table])
        if rc != 0:
            if _MISSING in err:
                return None
            raise FirewallError(f"nft list table inet {self.table} failed: {err.strip()}")
        return parse_table(out, self.table)

    def apply(self, spec: FirewallSpec, check_mode: bool = False) -> dict[str, Any]:
        """Make the table ``spec``'s; the result says what differed (``changes``) and what the
        table counted so far."""
        if spec.table != self.table:
            raise FirewallError(f"the spec is for table {spec.table}, not {self.table}")
        before = self.read()
        changes = differences(spec, before)
        after = before
        if changes and not check_mode:
            lines = script(spec, before)
            rc, _out, err = self.run(["nft", "-f", "-"], data="\n".join(lines) + "\n")
            if rc != 0:
                raise FirewallError(f"nft -f - failed, table inet {self.table} left as it was: {err.strip()}")
            after = self.read()
            left = differences(spec, after)
            if left:
                raise FirewallError(f"table inet {self.table} is not what was written: {'; '.join(left)}")
        return {"changed": bool(changes), "changes": changes, "created": before is None,
                **refusals(after)}

    def remove(self, check_mode: bool = False) -> dict[str, Any]:
        before = self.read()
        if before is not None and not check_mode:
            rc, _out, err = self.run(["nft", "delete", "table", "inet", self.table])
            if rc != 0:
                raise FirewallError(f"nft delete table inet {self.table} failed: {err.strip()}")
        return {"changed": before is not None, "removed": before is not None, **refusals(before)}


def refusals(state: TableState | None) -> dict[str, Any]:
    """The counts a table holds: connection attempts (SYNs) to console ports allowed, refused, and
    refused over the rate limits, and the refused sources it remembers (most refusals first)."""
    counters = state.counters if state is not None else {}
    zero = {"packets": 0, "bytes": 0}
    return {
        "allowed_attempts": counters.get(ALLOWED_COUNTER, zero)["packets"],
        "refused_attempts": counters.get(REFUSED_COUNTER, zero)["packets"],
        "rate_limited_attempts": counters.get(RATE_LIMITED_COUNTER, zero)["packets"],
        "refused_sources": state.refused_sources if state is not None else [],
    }
