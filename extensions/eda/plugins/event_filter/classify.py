"""classify: judge every console session event against the console policy, add the verdict
to the event as ``event.virtguard`` and append the event to the audit log.

An ansible-rulebook event filter for ``virtguard.console.libvirt_graphics`` events. The
policy itself lives in ``plugins/module_utils/console_policy.py``; this file only wires it in.
"""

DOCUMENTATION = r"""
---
short_description: Judge console session events against the console policy and audit them.
description:
  - An event filter for C(virtguard.console.libvirt_graphics) events. It adds the policy's
    verdict to each graphics event as C(event.virtguard) and appends the event to the audit log.
    Other events pass unchanged. docs/rulebooks.md describes the verdict and the audit records.
  - Argument values may be written C("{{ rulebook_var }}") like source arguments. ansible-rulebook
    1.3 renders the arguments of sources but not of filters, so this filter renders them itself,
    with ansible-rulebook's own renderer, against the activation's variables (C(--vars),
    C(--env-vars), or what the EDA server sent) the first time it runs.
  - For an event that should start a remediation, C(event.meta.hosts) is set to the target
    host, so ansible-rulebook limits the playbook or job run to it.
options:
  trusted_networks:
    description:
      - CIDR list (IPv4, IPv6). Sessions from other addresses are cut at C(connect).
        Omitted or null, no network rule; an empty list trusts nothing.
    type: list
    elements: str
  allowed_identities:
    description:
      - Certificate DNs (as libvirt reports them, RFC 4514 escapes included) and SASL user names.
        When non-empty, an initialized session that carries identities, none of them in the list,
        is cut.
    type: list
    elements: str
    default: []
  require_identity:
    description: When true, an initialized session with no identity at all is cut too.
    type: bool
    default: false
  host_map:
    description:
      - URI or URI host name to the inventory host that remediates it. Default, the URI's host
        name, C(localhost) for a local URI.
    type: dict
    default: {}
  block_seconds:
    description: How long remediation blocks an address, in seconds (copied into the verdict).
    type: int
    default: 600
  remediation_holdoff:
    description:
      - Seconds during which one remediation covers its address, so a storm of connections from
        one address triggers one run. At most O(block_seconds).
    type: int
    default: 60
  bruteforce_threshold:
    description:
      - This many sessions that disconnect without ever initializing, from one address within
        O(bruteforce_window) seconds, block the address. C(0) switches the rule off.
    type: int
    default: 0
  bruteforce_window:
    description: The brute-force window, in seconds.
    type: int
    default: 60
  audit_log:
    description: Path of the JSON Lines audit file. Empty or omitted, no audit.
    type: str
    default: ""
  audit_fsync:
    description: When event records are synced to disk.
    type: str
    choices: [always, interval, never]
    default: interval
"""

EXAMPLES = r"""
- name: Unauthorized console sessions
  hosts: all
  sources:
    - virtguard.console.libvirt_graphics:
        uri: "{{ virtguard_uri }}"
      filters:
        - virtguard.console.classify:
            trusted_networks: "{{ virtguard_trusted_networks }}"
            audit_log: "{{ virtguard_audit_log | default('') }}"
  rules:
    - name: Cut and block
      condition: event.virtguard.remediate == true
      action:
        run_playbook:
          name: virtguard.console.remediate_console
"""

RETURN = r"""
virtguard:
  description:
    - Added to every graphics event. It never holds text chosen by the client.
  returned: for events with a C(graphics) key
  type: dict
  contains:
    verdict:
      description: C(allow), C(cut) or C(block).
      type: str
    reasons:
      description: >-
        Codes among C(untrusted_network), C(identity_not_allowed), C(identity_missing),
        C(unparsable_address), C(bruteforce).
      type: list
      elements: str
    remediate:
      description: True for the event that should start a remediation (the first of its address within the hold-off).
      type: bool
    covered_by:
      description: The session whose remediation covers this one.
      type: str
    remote:
      description: C(address) (normalised), C(family), C(port), C(trusted).
      type: dict
    local_port:
      description: The console port of the session.
      type: int
    session_id:
      description: The session id from the event source.
      type: str
    target_host:
      description: The inventory host that remediates.
      type: str
    block_seconds:
      description: How long a block lasts.
      type: int
    audit_error:
      description: True when the audit append failed.
      type: bool
"""

import asyncio
import logging
import os
import sys
import time


def _import_collection_utils():
    """ansible-rulebook loads this file by path; make ``ansible_collections`` importable from
    the collection tree it was loaded from when it is not already."""
    try:
        from ansible_collections.virtguard.console.plugins.module_utils import (  # noqa: F401
            console_policy,
        )
    except ImportError:
        here = os.path.abspath(__file__)
        parts = here.split(os.sep)
        if "ansible_collections" not in parts:
            raise
        top = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index("ansible_collections")])
        sys.path.append(top or os.sep)


_import_collection_utils()

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import (  # noqa: E402
    AuditError,
    AuditLog,
    event_record,
)
from ansible_collections.virtguard.console.plugins.module_utils.console_policy import (  # noqa: E402
    Classifier,
    ConsolePolicy,
)

LOGGER = logging.getLogger("virtguard.console.classify")

POLICY_ARGUMENTS = ("trusted_networks", "allowed_identities", "require_identity", "host_map",
                    "block_seconds", "remediation_holdoff", "bruteforce_threshold", "bruteforce_window")
KNOWN_ARGUMENTS = POLICY_ARGUMENTS + ("audit_log", "audit_fsync")

# One state per loaded copy of this file: ansible-rulebook runs the file once per source.
_STATE = {}


def activation_variables():
    """The variables of the running ansible-rulebook activation, or None outside one.

    Filters are called from the source's task, whose coroutine is ansible-rulebook's
    ``start_source(source, source_dirs, variables, ...)``."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    if frame is None:
        frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "start_source" and "ansible_rulebook" in frame.f_code.co_filename:
            variables = frame.f_locals.get("variables")
            return variables if isinstance(variables, dict) else None
        frame = frame.f_back
    return None


def render_arguments(kwargs, variables):
    """Render ``{{ ... }}`` argument values as ansible-rulebook renders source arguments."""
    if not any(isinstance(v, str) and "{{" in v for v in kwargs.values()):
        return dict(kwargs)
    if variables is None:
        raise ValueError("virtguard.console.classify: arguments refer to rulebook variables but no "
                         "ansible-rulebook activation variables were found")
    from ansible_rulebook.util import substitute_variables

    return {key: substitute_variables(value, variables) for key, value in kwargs.items()}


class ClassifyState:
    def __init__(self, kwargs):
        unknown = sorted(set(kwargs) - set(KNOWN_ARGUMENTS))
        if unknown:
            raise ValueError("virtguard.console.classify: unknown argument(s) %s; known: %s"
                             % (", ".join(unknown), ", ".join(KNOWN_ARGUMENTS)))
        args = render_arguments(kwargs, activation_variables())
        policy_args = {k: args[k] for k in POLICY_ARGUMENTS if k in args and args[k] is not None}
        self.classifier = Classifier(ConsolePolicy(**policy_args))
        path = args.get("audit_log") or ""
        self.audit = AuditLog(str(path), fsync=args.get("audit_fsync") or "interval") if path else None
        self._audit_failed_at = None

    def audit_event(self, graphics, verdict):
        if self.audit is None:
            return
        try:
            self.audit.append(event_record(graphics, verdict))
            self._audit_failed_at = None
        except AuditError as exc:
            verdict["audit_error"] = True
            now = time.monotonic()
            if self._audit_failed_at is None or now - self._audit_failed_at > 10:
                self._audit_failed_at = now
                LOGGER.error("%s", exc)


def _state_for(kwargs):
    key = repr(sorted(kwargs.items()))
    state = _STATE.get(key)
    if state is None:
        state = _STATE[key] = ClassifyState(kwargs)
    return state


def main(event, **kwargs):
    """Add ``event.virtguard`` to a graphics event and audit it; other events pass unchanged."""
    graphics = event.get("graphics") if isinstance(event, dict) else None
    if not isinstance(graphics, dict):
        return event
    state = _state_for(kwargs)
    try:
        verdict = state.classifier.classify(graphics, time.monotonic())
    except Exception as exc:  # a malformed event must not stop the source; keep it on record
        LOGGER.exception("cannot classify a graphics event")
        verdict = {"verdict": "error", "reasons": [], "remediate": False, "error": type(exc).__name__}
    event["virtguard"] = verdict
    if verdict.get("remediate"):
        event.setdefault("meta", {})["hosts"] = verdict["target_host"]
    state.audit_event(graphics, verdict)
    return event
