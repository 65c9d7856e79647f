"""What an audit log lost, counted two ways: what the activation log states as lost, and what
is missing from the file against an independent witness of what should be in it.

* event records: the filter writes one per graphics event, so what should be there is every
  graphics event ``virsh event`` (lab.hypervisor.EventWitness) saw on the hypervisor over the
  same time; missing = that many less the file's event records; stated = the last "N record(s)
  lost in all" of the filter;
* remediation records: two per playbook run that ran its audit task (the task's banner in the
  activation log); missing = that many less the file's remediation records; stated = the sum of
  "audit record: FAILED, N record(s) lost" in the results of the runs' last play.

Used by tests/integration/test_audit_lock.py and bench/resilience.py (a reader holding the
audit file's lock through a storm)."""

from __future__ import annotations

import re
from typing import Any

AUDIT_TASK_BANNER = "TASK [Record the block and the cut, with their results, in the audit log]"


def stated_lost_in_all(log: str) -> list[int]:
    """The whole loss of event records each of the filter's statements gave, in order."""
    return [int(n) for n in re.findall(r"virtguard: audit log \S+[: ].*?(\d+) record\(s\) lost in all", log)]


def audit_loss(witnessed: str, log: str, records: list[dict[str, Any]]) -> dict[str, int]:
    """The counts of both kinds of record: ``graphics_events`` (the witness's), ``event_records``
    (the file's), ``stated_lost_events``; ``audit_runs``, ``remediation_records`` (the file's),
    ``stated_lost_remediations``. ``witnessed`` is the witness's output, ``log`` the activation
    log, ``records`` the audit file's records."""
    stated = stated_lost_in_all(log)
    return {
        "graphics_events": len(re.findall(r"^event 'graphics' for domain ", witnessed, re.M)),
        "event_records": sum(r["record"] == "event" for r in records),
        "stated_lost_events": stated[-1] if stated else 0,
        "audit_runs": log.count(AUDIT_TASK_BANNER),
        "remediation_records": sum(r["record"] == "remediation" for r in records),
        # each failed run's last play prints its message twice (an [ERROR] line, then the result): count the result
        "stated_lost_remediations": sum(int(n) for n in re.findall(
            r'"msg": "block and cut: [^;"]*; audit record: FAILED, (\d+) record\(s\) lost', log)),
    }


def missing_events(counts: dict[str, int]) -> int:
    return counts["graphics_events"] - counts["event_records"]


def missing_remediations(counts: dict[str, int]) -> int:
    return 2 * counts["audit_runs"] - counts["remediation_records"]
