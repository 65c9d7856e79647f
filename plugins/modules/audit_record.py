#!/usr/bin/python
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: audit_record
short_description: Append remediation records to the console audit log (JSON Lines)
version_added: 0.1.0
description:
  - 'Appends one JSON object per entry of O(actions), each on one line, to O(path):
    C({"record": "remediation", "time", "action", "ok", ...context, "result"}).'
  - The file is opened with C(O_APPEND), the records are appended under an exclusive C(flock)
    in one C(write()) (continued if the kernel writes less) and the file is synced, so records
    of concurrent writers (the C(virtguard.console.classify) event filter, other playbook runs)
    never mix and earlier lines are never rewritten.
  - A record is written whole or not at all. If the write fails part-way (disk full, file size
    limit), the records written whole stay, the rest is removed, the file still ends at a line
    boundary, and the module fails, saying how many records were written.
  - The lock is waited for at most O(lock_timeout) seconds, never without bound. Anyone who can
    open the file, a reader included, can take a C(flock) on it and keep it; past the bound the
    module fails (no record written, RV(records_lost) says how many) instead of hanging the run.
  - O(path) must be the file itself. A symlink there is refused, as is anything but a regular file.
  - The same file holds the C(event) records that the C(virtguard.console.classify) event
    filter writes; C(session_id) in O(context) ties a remediation to its session's events.
author:
  - virtguard.console developers (@virtguard)
extends_documentation_fragment:
  - virtguard.console.attributes
attributes:
  check_mode:
    support: full
    details: Reports the records it would write and writes nothing.
  diff_mode:
    support: none
options:
  path:
    description: The audit log; created (mode 0640) when missing.
    type: path
    required: true
  actions:
    description: The actions to record, in order.
    type: list
    elements: dict
    required: true
    suboptions:
      action:
        description: What was done, such as C(block) or C(cut).
        type: str
        required: true
      ok:
        description: Whether the action succeeded.
        type: bool
        required: true
      result:
        description: What the action did or why it failed (a module's registered result, a message).
        type: raw
  context:
    description: Fields merged into every record, such as C(session_id), C(reasons), C(target_host).
    type: dict
    default: {}
  lock_timeout:
    description:
      - Seconds to wait for the audit file's lock before giving up; C(0) tries once.
      - The collection's writers hold the lock for one append (about a millisecond), so the
        default leaves a wide margin for a busy disk while bounding how long a lock held by
        something else (a reader that locks the file) can hold up the playbook run.
    type: float
    default: 2.0
"""

EXAMPLES = r"""
- name: Record the block and the cut
  virtguard.console.audit_record:
    path: /var/log/virtguard/console-audit.jsonl
    actions:
      - action: block
        ok: "{{ block_result is succeeded }}"
        result: "{{ block_result }}"
      - action: cut
        ok: "{{ cut_result is succeeded }}"
        result: "{{ cut_result }}"
    context:
      session_id: 0123456789abcdef0123456789abcdef
"""

RETURN = r"""
records:
  description: The records written (or, in check mode, that would be written).
  returned: always
  type: list
  elements: dict
records_written:
  description: How many of O(actions)' records are in the file (the first ones, in order).
  returned: always
  type: int
records_lost:
  description: How many of O(actions)' records are not in the file (the last ones, in order); 0 on success.
  returned: always
  type: int
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import (
    DEFAULT_LOCK_TIMEOUT,
    AuditError,
    AuditLog,
    encode_record,
    remediation_record,
)

# Ansible's bookkeeping keys in a registered result: noise in an audit record.
_RESULT_NOISE = ("invocation", "_ansible_no_log", "_ansible_verbose_always", "ansible_facts")


def _clean(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if k not in _RESULT_NOISE}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            actions=dict(type="list", elements="dict", required=True, options=dict(
                action=dict(type="str", required=True),
                ok=dict(type="bool", required=True),
                result=dict(type="raw"),
            )),
            context=dict(type="dict", default={}),
            lock_timeout=dict(type="float", default=DEFAULT_LOCK_TIMEOUT),
        ),
        supports_check_mode=True,
    )
    params = module.params
    records = [remediation_record(entry["action"], entry["ok"], _clean(entry["result"]), params["context"])
               for entry in params["actions"]]
    if module.check_mode:
        module.exit_json(changed=False, records=records, records_written=0, records_lost=0)
    try:
        log = AuditLog(params["path"], fsync="always", lock_timeout=params["lock_timeout"])
        try:
            log.append_lines(b"".join(encode_record(record) for record in records))
        finally:
            log.close()
    except AuditError as exc:
        lost = len(records) - exc.lines_written
        module.fail_json(msg=f"{exc}; {lost} of {len(records)} audit record(s) lost", records=records,
                         records_written=exc.lines_written, records_lost=lost)
    module.exit_json(changed=bool(records), records=records, records_written=len(records), records_lost=0)


if __name__ == "__main__":
    main()
