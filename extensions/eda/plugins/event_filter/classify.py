"""classify: judge every console session event against the console policy, add the verdict
to the event as ``event.virtguard``, batch what must be remediated and audit every event.

An ansible-rulebook event filter for ``virtguard.console.libvirt_graphics`` events. The
policy lives in ``plugins/plugin_utils/console_policy.py``, the batching in
``remediation_batches.py``, the audit writer in ``audit_log.py``; this file declares the
arguments and wires them in.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
short_description: Judge console session events, batch their remediation and audit them.
description:
  - An event filter for C(virtguard.console.libvirt_graphics) events. It adds the policy's
    verdict to each graphics event as C(event.virtguard) and appends the event to the audit log
    (on a thread of its own, never on the event loop). Other events pass unchanged.
    docs/rulebooks.md describes the verdict, the batches and the audit records.
  - Offending sessions are remediated in batches, one run at a time per hypervisor host. The
    event that starts a run carries C(event.virtguard.remediate=true) and the whole batch in
    C(event.virtguard.batch); C(event.meta.hosts) is set to the host that remediates, so
    ansible-rulebook limits the playbook or job run to it.
  - Argument values may be written C("{{ rulebook_var }}") like source arguments. They are
    rendered with ansible-rulebook's own renderer against the activation's variables and checked
    when ansible-rulebook loads the filter, so a wrong value stops the activation at start with
    a message that names the argument and its variable.
options:
  trusted_networks:
    description:
      - CIDR list (IPv4, IPv6). Sessions from other addresses are cut at C(connect).
        Omitted or null, no network rule; an empty list trusts nothing.
      - A listed trusted address is never blocked, nor any network that holds it, by either
        rulebook. A session from it that fails the identity policy is cut alone, by its exact
        connection, and a brute force from it is reported (verdict C(report)), never blocked.
    type: list
    elements: str
  console_proxies:
    description:
      - Addresses or networks of console proxies (websockify/noVNC, nova-novncproxy, an SSH
        tunnel's end on the hypervisor). Every user behind a proxy reaches QEMU from its address.
        Sessions from there are judged by identity only; the address is never blocked (nor a
        network that holds it) and never cut for its address. A session from a proxy that fails
        the identity policy is cut alone, by its exact connection; a brute force through a proxy
        is reported (verdict C(report)), never blocked.
    type: list
    elements: str
    default: []
  cut_untrusted:
    description:
      - When false, sessions from outside O(trusted_networks) are not cut; the trusted networks
        then only keep blocks off trusted addresses (see O(ipv6_prefix)). The C(bruteforce)
        rulebook sets it, so that a brute force from a trusted address's IPv6 prefix blocks the
        attacking address, never the prefix with the trusted address in it.
    type: bool
    default: true
  allowed_identities:
    description:
      - >-
        Who may use a console, as typed entries. C({x509_dname: DN}) is a client certificate's
        subject, compared as a distinguished name (RFC 4514; attribute types and the case of values
        do not matter, nor spaces around separators). C({sasl_username: NAME}) is a SASL login,
        compared exactly. C({x509_dname: DN, sasl_username: NAME}) is a pair, allowed only together.
      - A session is allowed only if every identity it carries is allowed, by an entry of its type
        or as a pair. A DN never matches a SASL entry, nor the reverse. Empty, every identity is.
      - Plain strings (untyped, matching a DN or a SASL name written exactly so) still work in this
        release, with a warning at start that names them.
      - An entry that does not parse, or that can never match, stops the activation at start.
    type: list
    elements: raw
    default: []
  require_identity:
    description:
      - Which identities an initialized session must carry, else it is cut (C(identity_missing)).
        C(false) none, C(true) at least one, C(x509) a client certificate, C(sasl) a SASL login,
        C(both) both. SPICE sessions never carry one (C(spice_no_identity)).
    type: raw
    default: false
  host_map:
    description:
      - URI or URI host name to the inventory host that remediates it. Default, the URI's host
        name, C(localhost) for a local URI.
    type: dict
    default: {}
  block_seconds:
    description: How long remediation blocks a network, in seconds (at most what nftables accepts).
    type: int
    default: 600
  ipv6_prefix:
    description:
      - IPv6 clients are counted (brute force) and blocked per prefix of this length; C(128) means
        per address. A prefix that holds a trusted address is never blocked (then the address alone).
    type: int
    default: 64
  remediation_holdoff:
    description:
      - Seconds a remediation run is waited for. The next batch of a host is sent once every
        session of the run in flight has disconnected, or after this long.
    type: float
    default: 30
  second_run_wait:
    description:
      - At the start of a storm, a second run of a host goes beside the one in flight (sent less
        than 1 s before) on the host's first heartbeat at which an offender has waited this many
        seconds, with every offender waiting; never more than two runs of a host at a time.
        Without it, offenders that arrive while a run is in flight wait for that whole run, then
        their own. The source's busy heartbeat
        (O(virtguard.console.libvirt_graphics#event_source:busy_heartbeat_delay)) brings it.
      - C(0) keeps one run in flight per host (on a controller with fewer cores than busy hosts).
    type: float
    default: 0.25
  max_batch:
    description: At most this many offenders in one run; the rest go into the next.
    type: int
    default: 1000
  console_ports:
    description:
      - Ports or ranges (C(5900-5999)) blocked and cut besides the ports QEMU listens on, which
        remediation finds on the host itself. Default none.
    type: list
    elements: raw
    default: []
  nft_table:
    description: The nftables table (family C(inet)) that holds the blocks on the hypervisor.
    type: str
    default: virtguard
  block_set_size:
    description: Elements each block set holds at most; a full set is reported, cutting goes on.
    type: int
    default: 65536
  bruteforce_threshold:
    description:
      - This many sessions that disconnect without ever initializing, from one network within
        O(bruteforce_window) seconds, block the network. C(0) switches the rule off.
    type: int
    default: 0
  bruteforce_window:
    description: The brute-force window, in seconds.
    type: float
    default: 60
  remediation:
    description:
      - When false, events get their verdict and are audited, and nothing is sent to remediation
        (C(remediate) stays false), as in the C(console_audit) rulebook.
    type: bool
    default: true
  block_scope:
    description:
      - C(hypervisor) runs each remediation on the hypervisor host that serves the sessions;
        C(fleet) runs it on every host of O(fleet_group), so an offending network is blocked on
        every hypervisor of the activation and cut wherever it has sessions.
    type: str
    choices: [hypervisor, fleet]
    default: hypervisor
  fleet_group:
    description: The inventory group of the activation's hypervisor hosts, for O(block_scope=fleet).
    type: str
    default: all
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
        # no extra_vars built from event.graphics: the playbook reads event.virtguard only
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
      description: >-
        C(allow), C(cut), C(block), C(channel) for the events of a SPICE client's other channels
        (the client is judged on its primary channel), C(report) for a brute force from an address
        that may not be blocked (trusted or a console proxy's), C(health) on hypervisor health
        events (C(event.hypervisor)), or C(error) for an event that could not be judged.
      type: str
    failed_login:
      description: >-
        On the disconnect of a session's primary channel: whether it counts as a failed login (it
        left before C(initialize), on a console that asks for authentication, and neither
        remediation nor the end of its domain ended it).
      type: bool
    ended_by:
      description: On disconnects, C(client) or C(domain) (the domain stopped under the session).
      type: str
    state:
      description: >-
        On health events, the hypervisor watch's state (C(connecting), C(connected), C(reconnecting),
        C(unreachable), ...); C(previous) and C(changed) as the source gave them.
      type: str
    reasons:
      description: >-
        Codes among C(untrusted_network), C(identity_not_allowed), C(identity_missing),
        C(spice_no_identity), C(unparsable_address), C(bruteforce).
      type: list
      elements: str
    error:
      description: On C(error) verdicts, the type of the exception that kept the event from being judged.
      type: str
    phase:
      description: The event's phase, C(connect), C(initialize) or C(disconnect) (C(unknown) for anything else).
      type: str
    snapshot:
      description: Whether the event came from the source's snapshot rather than live.
      type: bool
    remediate:
      description: True for the event that starts a remediation run; the run's offenders are in C(batch).
      type: bool
    protocol:
      description: C(vnc) or C(spice).
      type: str
    primary:
      description: Whether the event is of the session's primary connection (a SPICE client's main channel).
      type: bool
    queued:
      description: True when this event's offender waits for a run (the next one of its host).
      type: bool
    batch:
      description: >-
        On C(remediate) events: the offenders of the run, each with C(session_id), C(address),
        C(network) (what is blocked), C(client_port), C(console_port), C(reasons) and C(block)
        (false: a protected address's session, cut alone and never blocked).
      type: list
      elements: dict
    remediation:
      description: >-
        On C(remediate) events, the run's settings; C(networks) (blocked and cut), C(sessions)
        (exact connections cut, never blocked), C(protected_networks) (trusted networks and console
        proxies: no block may cover them), C(console_ports), C(nft_table), C(set_size),
        C(block_seconds), C(audit_log) and C(scope) (C(hypervisor) or C(fleet)).
      type: dict
    remote:
      description: >-
        C(address) (normalised), C(network) (what a block would cover), C(family), C(port),
        C(trusted), C(proxy) (a console proxy's address).
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
      description: True when records could not be appended to the audit log since the last event.
      type: bool
"""

import logging
import os
import sys
import time
from typing import Any


def _import_collection_utils() -> None:
    """ansible-rulebook loads this file by path; make ``ansible_collections`` importable from
    the collection tree it was loaded from when it is not already."""
    try:
        from ansible_collections.virtguard.console.plugins.plugin_utils import (  # noqa: F401
            console_policy,
        )
    except ImportError:
        parts = os.path.abspath(__file__).split(os.sep)
        if "ansible_collections" not in parts:
            raise
        top = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index("ansible_collections")])
        sys.path.append(top or os.sep)


_import_collection_utils()

from ansible_collections.virtguard.console.plugins.plugin_utils.classify_filter import (
    FilterState,
    classify_event,
    source_uris,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_targets import (
    check_remediation_targets,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.rulebook_context import (
    loading_filter,
    rulebook_inventory,
)

LOGGER = logging.getLogger("virtguard.console.classify")

# One state per loaded copy of this file (ansible-rulebook loads it once per source), per arguments.
_STATES: dict[str, FilterState] = {}


def _state_for(kwargs: dict[str, Any]) -> FilterState:
    key = repr(sorted(kwargs.items()))
    state = _STATES.get(key)
    if state is None:
        state = _STATES[key] = FilterState.from_arguments(kwargs)
    return state


# Loaded by ansible-rulebook: render and check the arguments now, so that a wrong one stops the
# activation when it starts instead of at the first console event; likewise a hypervisor that no
# inventory host can remediate.
_LOADING = loading_filter()
if _LOADING is not None:
    _LOADED = _STATES[repr(sorted(_LOADING.filter_args.items()))] = FilterState.from_arguments(
        _LOADING.filter_args, _LOADING.variables)
    check_remediation_targets(_LOADED, source_uris(_LOADING), rulebook_inventory())


def main(event: Any, **kwargs: Any) -> Any:
    """Add ``event.virtguard`` to a graphics event or a hypervisor health event and audit it;
    other events pass unchanged (``event`` is whatever the source put on its queue: not always
    a dict)."""
    if not isinstance(event, dict) or not (isinstance(event.get("graphics"), dict)
                                           or isinstance(event.get("hypervisor"), dict)):
        return event
    return classify_event(_state_for(kwargs), event, time.monotonic())
