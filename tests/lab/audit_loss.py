"""What an audit log lost, counted two ways: what the activation log states as lost, and what
is missing from the file against an independent witness of what should be in it.

* event records: the filter writes one per graphics event, so what should be there is every
  graphics event ``virsh event`` (lab.hypervisor.EventWitness) saw on the hypervisor over the
  same time; missing = that many less the file's event records; stated = the last "N record(s)
  lost in all" of the filter, which also counts its health records (a batch sent on a
  heartbeat), which no witness sees: ``seq_gaps`` counts every record missing between the
  filter's first and last record in the file by their ``seq`` (so the test ends on a record
  written, and the stated loss is exact when it equals the gaps, and holds the events missing);
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
        "seq_gaps": seq_gaps([r["seq"] for r in records if "seq" in r]),
        "audit_runs": log.count(AUDIT_TASK_BANNER),
        "remediation_records": sum(r["record"] == "remediation" for r in records),
        # each failed run's last play prints its message twice (an [ERROR] line, then the result): count the result
        "stated_lost_remediations": sum(int(n) for n in re.findall(
            r'"msg": "block and cut: [^;"]*; audit record: FAILED, (\d+) record\(s\) lost', log)),
    }


def seq_gaps(seqs: list[int]) -> int:
    """How many numbers between 0 and the highest of ``seqs`` are not among them."""
    return max(seqs) + 1 - len(set(seqs)) if seqs else 0


def missing_events(counts: dict[str, int]) -> int:
    return counts["graphics_events"] - counts["event_records"]


def events_stated_exactly(counts: dict[str, int]) -> bool:
    """Whether the filter's stated loss is every record missing by ``seq``, the graphics events
    the witness saw and the file lacks among them."""
    return counts["stated_lost_events"] == counts["seq_gaps"] and missing_events(counts) <= counts["seq_gaps"]


def missing_remediations(counts: dict[str, int]) -> int:
    return 2 * counts["audit_runs"] - counts["remediation_records"]
