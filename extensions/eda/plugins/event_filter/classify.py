"""classify: judge every console session event against the console policy, add the verdict
to the event as ``event.virtguard`` and append the event to the audit log.

An ansible-rulebook event filter for ``virtguard.console.libvirt_graphics`` events. The
policy itself lives in ``plugins/module_utils/console_policy.py``; this file only wires it in.

Arguments (all optional):
    trusted_networks: CIDR list (IPv4, IPv6). Sessions from other addresses are cut at
        ``connect``. Omitted or null: no network rule.
    allowed_identities: certificate DNs and SASL user names. When non-empty, an initialized
        session that carries identities, none of them in the list, is cut.
    require_identity: when true, an initialized session with no identity at all is cut too.
    host_map: URI or URI host name -> inventory host that remediates it (default: the URI's
        host name, ``localhost`` for a local URI).
    block_seconds: how long remediation blocks an address (copied into the verdict).
    remediation_holdoff: seconds during which one remediation covers its address, so a storm
        of connections from one address triggers one playbook run (default 60, at most
        block_seconds).
    bruteforce_threshold, bruteforce_window: this many sessions that disconnect without ever
        initializing, from one address within the window (seconds), block it (0: off).
    audit_log: path of the JSON Lines audit file ('' or omitted: no audit).
    audit_fsync: always | interval (default) | never.

Argument values may be written ``"{{ rulebook_var }}"`` like source arguments:
ansible-rulebook 1.3 renders the arguments of sources but not of filters, so this filter
renders them itself, with ansible-rulebook's own renderer, against the activation's variables
(``--vars``, ``--env-vars``, or what the EDA server sent) the first time it runs.

The verdict (``event.virtguard``), see docs/rulebooks.md:
    verdict: allow | cut | block;  reasons: [untrusted_network, identity_not_allowed,
    identity_missing, unparsable_address, bruteforce];  remediate: true for the event that
    should start a remediation (the first of its address within the hold-off);
    covered_by: the session whose remediation covers this one;  remote: {address (normalised),
    family, port, trusted};  local_port;  session_id;  target_host;  block_seconds.
It never holds text chosen by the client. For an event to remediate, ``event.meta.hosts`` is
set to the target host, so ansible-rulebook limits the playbook run to it.

Example:
    filters:
      - virtguard.console.classify:
          trusted_networks: "{{ virtguard_trusted_networks }}"
          audit_log: "{{ virtguard_audit_log | default('') }}"
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
